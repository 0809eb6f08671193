"""fastswin benchmark runner: ``python -m benchmarks.run [--op OP] [--case NAME] ...``.

On a GPU it runs every case at its real batch; on a CPU it runs the same cases at a small
batch (``cpu_batch``), says so, and its timings only compare providers on that CPU.

Each row: p20/p50/p80 ms of ``fwd`` and ``fwd+bwd``, peak memory, analytic FLOPs and bytes,
achieved GB/s and TFLOP/s next to the copy bandwidth measured in the same run. Rows are
appended to ``benchmarks/results/<device>.csv``; a speedup summary closes the run.
"""
import argparse
import csv
import datetime
import math
import os
import re
import subprocess
import sys

import torch

from . import timing
from .cases import CASES
from .providers import PROVIDERS, build, flop_counter_check, mode_label
from .providers_common import first_line

COLUMNS = ["timestamp", "git_commit", "device", "torch", "triton", "cuda", "op", "case", "shape", "dtype",
           "mode", "provider", "ms_p20", "ms_p50", "ms_p80", "peak_mem_mb", "flops", "bytes", "gbps", "tflops",
           "copy_gbps"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _args(argv):
    ops = sorted({c.op for c in CASES})
    ap = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", action="append", choices=ops, help="only these ops (repeatable)")
    ap.add_argument("--case", action="append", help="only these case names (repeatable), e.g. swin_t_s1")
    ap.add_argument("--provider", action="append", help="only these providers (repeatable), e.g. naive")
    ap.add_argument("--skip-provider", action="append", default=[],
                    help="leave these providers out (repeatable), e.g. flex (compiles for each case)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--mode", action="append", choices=["fwd", "fwd+bwd", "infer", "train_step"],
                    help="fwd (whole models: infer) or fwd+bwd (whole models: train_step); default: both")
    ap.add_argument("--batch", type=int, help="override every case's batch")
    ap.add_argument("--quick", action="store_true", help="CPU-sized batches even on a GPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no CSV")
    return ap.parse_args(argv)


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(RESULTS)).decode().strip()
    except Exception:
        return "unknown"


def _env(device):
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    return dict(device=timing.device_name(device), torch=torch.__version__, triton=triton_v,
                cuda=torch.version.cuda or "none", git_commit=_git_commit())


def _fmt(x, nd=3):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def main(argv=None):
    a = _args(argv)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    alias = {"infer": "fwd", "train_step": "fwd+bwd"}
    modes = [m for m in ("fwd", "fwd+bwd") if not a.mode or m in {alias.get(x, x) for x in a.mode}]
    small = device.type == "cpu" or a.quick
    env = _env(device)
    if device.type == "cpu":
        print("CPU run: small batches; these timings compare providers on this CPU only. "
              "GPU figures need a GPU (bash benchmarks/gpu_check.sh OUTDIR).")
    copy_gbps = timing.copy_bandwidth_gbps(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | cuda {env['cuda']} | "
          f"commit {env['git_commit']} | dtype {str(dtype).replace('torch.', '')} | copy {copy_gbps:.1f} GB/s")
    cases = [c for c in CASES if (not a.op or c.op in a.op) and (not a.case or c.name in a.case)]
    if not cases:
        print("no case matches the filters", file=sys.stderr)
        return 2
    rows, skipped = [], []
    saved, path = 0, None
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    hdr = f"{'op':<16}{'case':<12}{'provider':<17}{'mode':<9}{'p50 ms':>10}{'p20':>9}{'p80':>9}{'GB/s':>9}{'TFLOP/s':>9}{'peak MB':>9}"
    print(hdr)
    for i, case in enumerate(cases, 1):
        batch = a.batch or (case.cpu_batch if small else case.batch)
        counted = flop_counter_check(case, device, dtype, batch)
        for prov in PROVIDERS[case.op]:
            if (a.provider and prov not in a.provider) or prov in a.skip_provider:
                continue
            torch.manual_seed(0)
            if prov == "flex" and device.type == "cpu" and not a.provider:
                # ~10 s of compilation per case and no backward on a CPU: only when asked for.
                work = "on a CPU, flex runs only when asked for (--provider flex): it compiles per case"
            else:
                work = None
            try:
                work = work or build(case, prov, device, dtype, batch)
            except Exception as e:  # one broken provider must not end the run
                work = f"building it raised {first_line(e)}"
            if isinstance(work, str):
                skipped.append((case.op, case.name, prov, work))
                print(f"  skip {case.op}/{case.name}/{prov}: {work}", flush=True)
                continue
            if counted is not None and counted != work.flops:
                print(f"  note: analytic FLOPs {work.flops} != FlopCounterMode {counted} for {case.name}")
            for timed in modes:
                fn = work.fwd if timed == "fwd" else work.fwd_bwd
                mode = mode_label(case.op, timed)  # whole models: "infer" / "train_step"
                if isinstance(fn, str):
                    skipped.append((case.op, case.name, f"{prov} ({mode})", fn))
                    print(f"  skip {case.op}/{case.name}/{prov} ({mode}): {fn}", flush=True)
                    continue
                if fn is None:
                    continue
                try:
                    ms = timing.bench(fn, device)
                    mem = timing.peak_memory_mb(lambda: fn(0), device)
                except Exception as e:  # e.g. out of memory at this batch
                    why = f"timing it raised {first_line(e)}"
                    skipped.append((case.op, case.name, f"{prov} ({mode})", why))
                    print(f"  skip {case.op}/{case.name}/{prov} ({mode}): {why}", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                nflops = work.flops * (3 if timed == "fwd+bwd" else 1)  # backward ~ 2x forward matmuls
                nbytes = work.bytes * (3 if timed == "fwd+bwd" else 1)
                row = dict(timestamp=stamp, **env, op=case.op, case=case.name, shape=work.shape,
                           dtype=str(dtype).replace("torch.", ""), mode=mode, provider=prov,
                           ms_p20=ms[0], ms_p50=ms[1], ms_p80=ms[2], peak_mem_mb=mem, flops=nflops, bytes=nbytes,
                           gbps=nbytes / (ms[1] * 1e-3) / 1e9, tflops=nflops / (ms[1] * 1e-3) / 1e12,
                           copy_gbps=copy_gbps)
                rows.append(row)
                print(f"{case.op:<16}{case.name:<12}{prov:<17}{mode:<9}{_fmt(ms[1]):>10}{_fmt(ms[0]):>9}"
                      f"{_fmt(ms[2]):>9}{_fmt(row['gbps'], 1):>9}{_fmt(row['tflops'], 2):>9}{_fmt(mem, 1):>9}"
                      f"   [{i}/{len(cases)}]", flush=True)
        if not a.no_save:  # after every case: a run cut short by a timeout keeps what it measured
            path = _save(rows[saved:], a.out, env, device) or path
            saved = len(rows)
    if skipped:
        print("\nskipped (provider cannot run here):")
        for op, name, prov, why in skipped:
            print(f"  {op}/{name}/{prov}: {why}")
    _summary(rows)
    if path:
        print(f"\n{len(rows)} rows appended to {os.path.relpath(path)}")
    return 0


def _save(rows, out, env, device):
    """Append ``rows`` to ``out/<device>.csv`` (header if new); returns the path (None: no rows)."""
    if not rows:
        return None
    os.makedirs(out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    slug = "cpu" if device.type == "cpu" else slug
    path = os.path.join(out, f"{slug}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def _summary(rows):
    """For each case and mode: every provider's time over the best fastswin backend's."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["mode"]), []).append(r)
    lines = []
    for (op, case, mode), rs in groups.items():
        fast = [r for r in rs if r["provider"].startswith("fastswin_")]
        if not fast:
            continue
        best = min(fast, key=lambda r: r["ms_p50"])
        others = ", ".join(f"{r['provider']} {r['ms_p50'] / best['ms_p50']:.2f}x" for r in rs if r is not best)
        lines.append(f"  {op}/{case} {mode}: best {best['provider']} {best['ms_p50']:.3f} ms; "
                     f"others relative to it: {others or 'none'}")
    print("\nspeedup summary (provider time / best fastswin time; >1 means fastswin is faster):")
    print("\n".join(lines) if lines else "  no fastswin backend ran on this device for these cases")


if __name__ == "__main__":
    sys.exit(main())
