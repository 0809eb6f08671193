"""A patched timm Swin model trains under ``DistributedDataParallel`` (two CPU processes, gloo).

Oracle: the same patched model (same seed, same weights) run in this process on the whole batch.
Each of the two ranks gets half the batch; the loss is a mean over the local half, so DDP's
averaged gradient (sum over ranks / world size) is the gradient of the mean over the whole
batch, which is what one process computes. Float64, reference backend, tolerance 1e-10 (only the
order of the batch reduction differs: ~1e-16 relative in float64).

The ranks are two subprocesses running this file as a script (``python tests/test_distributed.py
RANK WORLD PORT OUTDIR``), so a hang cannot outlive the test: both are killed after
``TIMEOUT_S``. Each rank initialises the gloo process group on 127.0.0.1 and a port found by
binding port 0, takes one SGD step, saves its gradients and updated parameters, and destroys the
process group.
"""
import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
BATCH = 4  # each rank gets BATCH // WORLD
LR = 0.1
TIMEOUT_S = 60
TOL = 1e-10
f64 = torch.float64


def _model():
    """Tiny patched timm Swin V1 (2 stages, window 4, a shifted block per stage), float64, train mode."""
    import fastswin
    from test_patch import _set_fused, _timm_model

    torch.manual_seed(0)
    m = _timm_model(False, img=32, window=4)  # random init scaled by test_patch._randomize
    _set_fused(m, False)
    assert fastswin.patch(m, backend="reference") == 4
    return m.train()  # drop_path 0, no dropout: training mode is deterministic


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, dtype=f64, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return x, y


def _step(model, x, y):
    """One SGD step; returns (loss, grads, params after the step), by parameter name of the inner model."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)  # mean over the local batch
    loss.backward()
    inner = getattr(model, "module", model)
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
    opt.step()
    params = {n: p.detach().clone() for n, p in inner.named_parameters()}
    return loss.detach(), grads, params


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import fastswin._patch as P
    from torch.nn.parallel import DistributedDataParallel as DDP

    calls = []
    fn = P.shifted_window_attention
    P.shifted_window_attention = lambda *a, **k: (calls.append(1), fn(*a, **k))[1]

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        model = DDP(_model())
        x, y = _batch()
        half = BATCH // world
        loss, grads, params = _step(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        torch.save({"loss": loss, "grads": grads, "params": params, "calls": len(calls)},
                   os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available in this torch build")
def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two ranks on two cores
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), str(WORLD), str(port), str(tmp_path)],
                              cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"

    # the same model, one process, whole batch
    want_loss, want_g, want_p = _step(_model(), *_batch())
    got_all = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # each rank saw its own half: local losses differ, and their mean is the whole batch's loss
    assert not torch.equal(got_all[0]["loss"], got_all[1]["loss"])
    torch.testing.assert_close(sum(g["loss"] for g in got_all) / WORLD, want_loss, rtol=0, atol=TOL)
    assert any(g.abs().max() > 1e-3 for g in want_g.values())
    for r, got in enumerate(got_all):
        assert got["calls"] == 4, f"rank {r}: the patched op ran {got['calls']} times, expected 4 (one per block)"
        assert got["grads"].keys() == want_g.keys()
        for n in want_g:
            torch.testing.assert_close(got["grads"][n], want_g[n], rtol=0, atol=TOL,
                                       msg=lambda m: f"rank {r} grad {n}: {m}")
            torch.testing.assert_close(got["params"][n], want_p[n], rtol=0, atol=TOL,
                                       msg=lambda m: f"rank {r} param {n} after the step: {m}")


if __name__ == "__main__":  # one DDP rank: python test_distributed.py RANK WORLD PORT OUTDIR
    sys.path.insert(0, HERE)
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
