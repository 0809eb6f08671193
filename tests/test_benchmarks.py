"""The benchmark suite on a CPU, fast: the runner's CLI and a tiny run of every op, the flop
formulas of the fused ops against FlopCounterMode on the naive path, timm's peer against the
naive path, and the report on a synthetic CSV. (The timings themselves mean nothing here.)"""
import csv
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import report, run, timing  # noqa: E402
from benchmarks.cases import CASES  # noqa: E402


def _fast_bench(fn, device, **kw):
    return timing.__dict__["_real_bench"](fn, device, reps_cpu=2, warmup_cpu=1, min_s_cpu=0.0)


@pytest.fixture
def quick_timing(monkeypatch):
    timing.__dict__.setdefault("_real_bench", timing.bench)
    monkeypatch.setattr(timing, "bench", _fast_bench)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--skip-provider" in out and "--quick" in out


def test_quick_run_every_op(quick_timing, capsys, tmp_path):
    # flex compiles for ~10 s per case on a CPU and fastswin_triton / auto would run the Triton
    # interpreter under TRITON_INTERPRET=1: left out to stay fast.
    args = ["--quick", "--no-save", "--batch", "1", "--device", "cpu", "--out", str(tmp_path),
            "--case", "swin_t_s3", "--case", "swinv2_w8", "--case", "datpp_s_s3",
            "--skip-provider", "flex", "--skip-provider", "fastswin_triton", "--skip-provider", "fastswin_auto"]
    assert run.main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for op, prov in [("swin_v1", "naive"), ("swin_v1", "timm"), ("swin_v1", "timm_sdpa"), ("swin_v2", "naive"),
                     ("dat", "official"), ("bilinear_sample", "grid_sample")]:
        for mode in ("fwd", "fwd+bwd"):
            assert any(l.split()[:4] == [op, l.split()[1], prov, mode] for l in lines if l.startswith(op)), (op, prov, mode)
    assert "dat/datpp_s_s3/naive: naive is the reference module" in out  # a skip comes with its reason
    assert "speedup summary" in out
    assert not os.listdir(tmp_path)  # --no-save


@pytest.mark.parametrize("name", ["swin_t_s3", "swin_t_s4"])
def test_timm_peers_match_naive(name):
    from benchmarks import providers_swin as ps

    case = next(c for c in CASES if c.name == name)
    dev, dt = torch.device("cpu"), torch.float64
    res, heads, d, m, s, _ = ps._geometry(case)
    qkv = torch.randn(1, res, res, 3, heads, d, dtype=dt)
    for prov in ("timm", "timm_sdpa"):
        work = ps.timm_provider(case, prov, dev, dt, 1)
        fn = work.fwd.__closure__[0].cell_contents  # fwd_only(fn, sets): its fn
        mod = next(c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, torch.nn.Module))
        table = mod.relative_position_bias_table.detach()
        import fastswin

        want = fastswin.functional.shifted_window_attention(qkv, table, (m, m), (s, s), backend="reference")
        torch.testing.assert_close(fn(qkv), want, rtol=1e-12, atol=1e-12)


def _count(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops()


@pytest.mark.parametrize("v2", [False, True])
def test_flop_formulas_count_like_naive(v2):
    """The fused ops, called on fake tensors (no kernel runs), count what the naive path counts,
    forward and backward, for a padded shifted case."""
    import fastswin
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastswin.ops import flop_formulas

    assert "shifted_window_attention_triton_fwd" in flop_formulas.register()
    flop_formulas.register()  # idempotent
    B, H, W, h, d, m, s = 2, 13, 10, 3, 16, 7, 3
    qkv = torch.randn(B, H, W, 3, h, d, requires_grad=True)
    table = torch.randn((2 * m - 1) ** 2, h, requires_grad=True)
    ls = torch.zeros(h, 1, 1, requires_grad=True)

    def naive():
        if v2:
            out = fastswin.functional.shifted_window_attention_v2(qkv, ls, table, (m, m), (s, s), backend="reference")
        else:
            out = fastswin.functional.shifted_window_attention(qkv, table, (m, m), (s, s), backend="reference")
        out.sum().backward()

    with FakeTensorMode():
        q, t, mult = torch.empty(B, H, W, 3, h, d), torch.empty((2 * m - 1) ** 2, h), torch.empty(h)
        ops = torch.ops.fastswin

        def fused():
            if v2:
                o, lse = ops.shifted_window_attention_v2_triton_fwd(q, mult, t, m, m, s, s, None)
                ops.shifted_window_attention_v2_triton_bwd(o, q, mult, t, o, lse, m, m, s, s, None, True, False)
            else:
                o, lse = ops.shifted_window_attention_triton_fwd(q, t, m, m, s, s, None, d ** -0.5)
                ops.shifted_window_attention_triton_bwd(o, q, t, o, lse, m, m, s, s, None, d ** -0.5, True, False)

        got = _count(fused)
    nw = (-(-H // m)) * (-(-W // m))
    assert got == _count(naive) == 3 * 4 * B * nw * h * (m * m) ** 2 * d


def test_flop_formulas_of_the_cuda_ops():
    """The CUDA window-attention ops (schemas compiled into fastswin._C) count like the Triton ops,
    on fake CUDA tensors: no GPU and no kernel needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastswin.functional  # noqa: F401  (registers the ops and their formulas)

    ops = torch.ops.fastswin
    if not hasattr(ops, "window_attention_cuda_fwd"):
        pytest.skip("fastswin._C was built without the CUDA window-attention ops")
    B, H, W, h, d, m, s = 2, 13, 10, 3, 16, 7, 3
    nw = (-(-H // m)) * (-(-W // m))
    with FakeTensorMode():
        q = torch.empty(B * nw, h, m * m, d, device="cuda", dtype=torch.float16)
        qkv = torch.empty(B, H, W, 3, h, d, device="cuda", dtype=torch.float16)
        t, mult = torch.empty((2 * m - 1) ** 2, h, device="cuda"), torch.empty(h, device="cuda")

        def windowed():
            o, lse = ops.window_attention_cuda_fwd(q, q, q, t, m, m, None, mult, False)
            ops.window_attention_cuda_bwd(o, q, q, q, t, o, lse, m, m, None, mult, False, True, False)

        def block():
            o, lse = ops.shifted_window_attention_cuda_fwd(qkv, t, m, m, s, s, None, mult, False)
            ops.shifted_window_attention_cuda_bwd(o, qkv, t, o, lse, m, m, s, s, None, mult, False, True, False, False)

        assert _count(windowed) == _count(block) == 3 * 4 * B * nw * h * (m * m) ** 2 * d


def _write_csv(path, device="NVIDIA H100 80GB HBM3", stamp="2025-01-02T03:04:05+00:00", ms=1.0):
    rows = []
    for op, case, provs in [("swin_v1", "swin_t_s1", ["naive", "timm_sdpa", "fastswin_triton"]),
                            ("dat", "dat_t_s3", ["official", "fastswin_cuda"])]:
        for mode in ("fwd", "fwd+bwd"):
            for p in provs:
                r = dict.fromkeys(run.COLUMNS, "")
                r.update(timestamp=stamp, git_commit="abc1234", device=device, torch="2.11.0", triton="3.6.0",
                         cuda="12.8", op=op, case=case, shape="B128", dtype="bfloat16", mode=mode, provider=p,
                         ms_p50=ms if p.startswith("fastswin_") else 2 * ms)
                rows.append(r)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=run.COLUMNS)
        w.writeheader()
        w.writerows(rows)


def test_report(tmp_path, capsys):
    readme = tmp_path / "README.md"
    body = "# x\n\n## Benchmarks\n\ntext\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\n## After\n"
    readme.write_text(body)
    results = tmp_path / "results"
    results.mkdir()
    _write_csv(results / "cpu.csv", device="cpu (x86_64, 2 threads)")
    assert report.main(["--results", str(results), "--readme", str(readme), "--no-plots"]) == 0
    assert "no GPU result" in capsys.readouterr().out
    assert readme.read_text() == body  # cpu.csv alone: unchanged
    _write_csv(results / "nvidia-h100-80gb-hbm3.csv")
    assert report.main(["--results", str(results), "--readme", str(readme), "--plots", str(tmp_path)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- bench:end -->\n\n## After\n") and text.startswith("# x\n")
    assert "NVIDIA H100 80GB HBM3" in text and "2025-01-02" in text
    assert "| swin_t_s1 | B128 | fwd | 2.000 | 2.000 | 1.000 | 2.00x (triton vs naive) |" in text
    assert "| dat_t_s3 | B128 | fwd+bwd | 2.000 | 1.000 | 2.00x (cuda vs official) |" in text
    out = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "nvidia-h100-80gb-hbm3_swin_v1.png").exists()
    except ImportError:
        assert "matplotlib is not installed" in out


# Shrunken models through the case's ``kwargs`` hook (Swin: 32 px, 2 stages, a shifted block;
# DAT: 64 px, 4 stages of depth 2, narrow): the real cases' code path in about a second each.
_SMALL = dict(img_size=32, embed_dim=24, depths=(2, 1), num_heads=(1, 2), window_size=4)
_SMALL_DAT = dict(img_size=64, dim_stem=24, dims=[24, 48, 96, 192], heads=[1, 2, 4, 8], groups=[-1, -1, 1, 2],
                  window_sizes=[4, 4, 4, 2], depths=[2, 2, 2, 2],
                  stage_spec=[["L", "S"], ["L", "S"], ["L", "D"], ["L", "D"]])


@pytest.mark.parametrize("op", ["model_swin_t", "model_swinv2_t", "model_dat_t"])
def test_model_cases_build_and_step(op):
    """Each whole-model case builds for naive and fastswin_auto on a CPU at batch 1 (the build
    probes one infer and one train_step), then one more call of each mode runs."""
    import dataclasses

    from benchmarks import providers_models as pm
    from benchmarks.providers import PROVIDERS, build

    case = next(c for c in CASES if c.op == op)
    assert case.name == "b128" and case.batch == 128 and case.cpu_batch <= 2
    small = _SMALL_DAT if op == "model_dat_t" else _SMALL
    case = dataclasses.replace(case, params=dict(case.params, side=small["img_size"], kwargs=small))
    assert {"naive", "fastswin_triton", "fastswin_cuda", "fastswin_auto"} <= set(PROVIDERS[op])
    assert ("timm_sdpa" in PROVIDERS[op]) == (op == "model_swin_t")
    dev = torch.device("cpu")
    naive = pm.counted_flops(case, "naive", dev, torch.float32, 1)
    for prov in ("naive", "fastswin_auto"):
        work = build(case, prov, dev, torch.float32, 1)
        assert not isinstance(work, str), work
        assert work.flops == naive > 0 and work.bytes != work.bytes  # model FLOPs; bytes NaN (no floor)
        logits = work.fwd(1)
        assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
        assert torch.isfinite(work.fwd_bwd(1))
    assert "auto->reference" in work.shape  # on a CPU auto runs the reference path
    assert "Triton" in build(case, "fastswin_triton", dev, torch.float32, 1)  # a skip, with its reason
    from benchmarks.providers import mode_label

    assert [mode_label(op, m) for m in ("fwd", "fwd+bwd")] == ["infer", "train_step"]
    assert mode_label("swin_v1", "fwd+bwd") == "fwd+bwd"


@pytest.mark.parametrize("name", ["dat_tiny", "dat_pp_tiny"])
def test_model_macs_match_the_papers(name):
    """DAT-T 4.6 G and DAT-T++ 4.3 G (papers' Table 1), counted on fastswin.models at 224 px.
    (Swin-T / SwinV2-T are counted by the main job; timm's models take longer to build.)"""
    from benchmarks import model_macs

    side, paper = model_macs.MODELS[name]
    g = model_macs.count_macs(model_macs.build(name), side) / 1e9
    assert round(g, 1) == paper, g
