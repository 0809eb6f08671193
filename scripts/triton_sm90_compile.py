"""Compile every Triton kernel of fastswin for an H100 (sm_90) without a GPU.

    python scripts/triton_sm90_compile.py [--quick]

The Triton tier of the tests runs the kernels under ``TRITON_INTERPRET=1``, which never calls
Triton's compiler: a kernel that the interpreter runs can still fail to compile for a GPU (an
API missing in the installed Triton, a type the backend rejects, a register/shared-memory limit
ptxas enforces). This script runs the real compiler -- Triton front end, MLIR passes, LLVM, PTX
and the wheel's ``ptxas`` -- for ``GPUTarget("cuda", 90, 32)`` through a stand-in driver, and
calls every launcher with ``warmup=True``: each kernel specialization the launchers would use is
compiled to a cubin and nothing is launched. Like CI's build of the ``.cu`` files, it proves
compilation only: numbers and speed need a GPU. It also fails a specialization whose shared
memory exceeds what an sm_90 block may use (the launch would fail), and prints each kernel's
largest shared-memory footprint (what bounds how many blocks share an SM).

Launchers are called on CPU tensors; since no kernel runs, the host code after a launch may
read garbage (e.g. an index from an unwritten buffer) and raise -- that is ignored. Only compile
errors count; the exit status is 1 if any specialization failed to compile.

Matrix: fp16, bf16, fp32 (IEEE dots) and fp32 with tf32 dots; window attention (windowed and
block-level; mask and V2 logit-scale on/off; deterministic and atomic table gradients; a
window small enough for the fused dq and one large enough for the separate dq kernel),
deformable attention (sampled rpe table and dense bias; one key block and several), bilinear
sampling (atomic and deterministic backward). ``--quick``: bf16 and fp32 only.
"""
import argparse
import itertools
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler; must precede any @triton.jit import

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _SM90Driver:
    """The part of Triton's active driver a compile-only launch asks for."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


compiled, failed = [], []  # (kernel, dtype, shared bytes, constexprs), (kernel, constexprs, error)
_current = {"dtype": ""}  # the matrix entry being compiled, for the report
SM90_SHARED = 232448  # 227 KB: the most dynamic shared memory one block may use on an H100
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
    meta = {k: v for k, v in kwargs.items() if k.isupper()}
    try:
        kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as e:  # a compile error: what this script is for
        failed.append((name, meta, f"{type(e).__name__}: {e}"))
        return None
    shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    compiled.append((name, _current["dtype"], shared, meta))
    if shared > SM90_SHARED:
        failed.append((name, meta, f"needs {shared} B of shared memory, sm_90 allows {SM90_SHARED} B per block"))
    return None


def _host(fn, *args, **kwargs):
    """A launcher call; host code after the skipped launch may trip over unwritten buffers."""
    try:
        return fn(*args, **kwargs)
    except Exception:
        return None


def _window(W, dt, window, det_modes):
    mh = mw = window
    n, h, d = window * window, 2, 32
    q, k, v = (torch.randn(4, h, n, d, dtype=dt) for _ in range(3))
    tab = torch.randn((2 * mh - 1) * (2 * mw - 1), h, dtype=dt)
    mask = torch.zeros(2, n, n, dtype=dt)
    for m, ls in itertools.product((None, mask), (None, torch.ones(h))):
        out = _host(W.window_attention_fwd, q, k, v, tab, (mh, mw), mask=m, logit_scale=ls)
        out, lse = out if out is not None else (torch.empty_like(q), torch.zeros(4, h, n))
        for det in det_modes:
            _host(W.window_attention_bwd, torch.randn_like(out), q, k, v, tab, out, lse, (mh, mw), mask=m,
                  deterministic=det, logit_scale=ls)
    side = 2 * window + 1  # padded map, shifted
    qkv = torch.randn(1, side, side, 3, h, d, dtype=dt)
    pad = torch.randn(3, h, d, dtype=dt)
    res = _host(W.shifted_window_attention_fwd, qkv, tab, (mh, mw), (window // 2, window // 2), pad_qkv=pad)
    o, l2 = res if res is not None else (torch.empty(1, side, side, h * d, dtype=dt), torch.zeros(1))
    _host(W.shifted_window_attention_bwd, torch.randn_like(o), qkv, tab, o, l2, (mh, mw), (window // 2, window // 2),
          pad_qkv=pad)


def _deformable(D, dt, hk, det_modes):
    b, h, g, c, m = 1, 4, 2, 32, 64
    q = torch.randn(b * h, c, m, dtype=dt)
    k, v = (torch.randn(b * h, c, hk * hk, dtype=dt) for _ in range(2))
    pos = torch.rand(b * g, hk, hk, 2, dtype=dt) * 2 - 1
    qgrid = torch.rand(m, 2) * 2 - 1
    for rpe, bias in ((torch.randn(h, 15, 15, dtype=dt), None), (None, torch.randn(b * h, m, hk * hk, dtype=dt))):
        res = _host(D.deformable_attention_fwd, q, k, v, pos, qgrid, rpe, bias, n_heads=h, n_groups=g, scale=c ** -0.5)
        o, lse = res if res is not None else (torch.empty_like(q), torch.zeros(b * h, m))
        for det in det_modes:
            _host(D.deformable_attention_bwd, torch.randn_like(o), q, k, v, pos, qgrid, rpe, bias, o, lse,
                  n_heads=h, n_groups=g, scale=c ** -0.5, deterministic=det)


def _bilinear(B, dt):
    feat = torch.randn(2, 8, 6, 6, dtype=dt)
    pos = torch.rand(2, 4, 4, 2, dtype=dt) * 2 - 1
    out = _host(B.bilinear_sample_fwd, feat, pos)
    out = out if out is not None else torch.empty(2, 8, 4, 4, dtype=dt)
    for det in (False, True):
        _host(B.bilinear_sample_bwd, torch.randn_like(out), feat, pos, deterministic=det)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bf16 and fp32 (IEEE) only")
    a = ap.parse_args(argv)
    _driver.set_active(_SM90Driver())
    JITFunction.run = _compile_only
    from fastswin.ops import window_attention_triton

    W = window_attention_triton._kernels()
    import importlib

    D = importlib.import_module("fastswin.kernels.deformable_attention")
    B = importlib.import_module("fastswin.kernels.bilinear_sample")
    matrix = [(torch.bfloat16, False), (torch.float32, False)]
    if not a.quick:
        matrix += [(torch.float16, False), (torch.float32, True)]
    t0 = time.time()
    for dt, tf32 in matrix:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        _current["dtype"] = str(dt).replace("torch.", "") + ("/tf32" if tf32 else "")
        _window(W, dt, 7, (False, True))   # one key block: dq fused into the dk/dv kernel
        _window(W, dt, 12, (False,))       # 144 tokens: several key blocks, separate dq kernel
        _deformable(D, dt, 4, (False, True))
        _deformable(D, dt, 16, (False,))
        _bilinear(B, dt)
    most = {}
    for name, dt, shared, meta in compiled:
        if shared >= most.get((name, dt), (-1,))[0]:
            most[(name, dt)] = (shared, meta)
    kernels = sorted({name for name, _ in most})
    print(f"triton {triton.__version__}, target sm_90: {len(compiled)} launches compiled in "
          f"{time.time() - t0:.0f} s, {len(failed)} failed; kernels: {', '.join(kernels)}")
    print("largest shared memory per kernel and dtype (bytes; sm_90: 232448 per block, 233472 per SM):")
    for (name, dt), (shared, meta) in sorted(most.items()):
        blocks = {k: v for k, v in meta.items() if k.startswith("BLOCK_") and k != "BLOCK_MODE"}
        print(f"  {name:<34} {dt:<14} {shared:>7}  {blocks}")
    for name, meta, err in failed:
        print(f"FAILED {name} {meta}: {err[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
