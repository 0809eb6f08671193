"""GMACs of whole models at their paper resolution, counted by ``FlopCounterMode`` (one
multiply-add = 2 FLOPs, so MACs = FLOPs / 2; papers' "FLOPs" for Swin are these MACs).

    python -m benchmarks.model_macs [--model NAME ...]

Swin models are built by timm with ``pretrained=False`` (offline; weights do not change the
count), DAT models by :mod:`fastswin.models`. fastswin's flop formulas are registered first, so a
model whose attention runs on a fused fastswin op counts the same as on the reference path.
FlopCounterMode counts matmuls, convolutions and SDPA; softmax, norms, GELU, bilinear sampling
and the like are not counted, as in the papers.
"""
import argparse
import sys

import torch

# name (timm's, or fastswin.models') -> (input side, GMACs the paper reports)
MODELS = {
    "swin_tiny_patch4_window7_224": (224, 4.5),   # Swin-T, Liu et al. 2021, Table 1
    "swinv2_tiny_window8_256": (256, 5.9),        # SwinV2-T, Liu et al. 2022 / timm model card
    "dat_tiny": (224, 4.6),                       # DAT-T, Xia et al. 2022, Table 1
    "dat_pp_tiny": (224, 4.3),                    # DAT-T++, Xia et al. 2023 (DAT++), Table 1
}


def build(name: str) -> torch.nn.Module:
    if name.startswith("dat"):
        import fastswin.models

        return fastswin.models.build(name, backend="reference").eval()
    import timm

    return timm.create_model(name, pretrained=False).eval()


def forward_flops(model: torch.nn.Module, side: int, device=torch.device("cpu"), dtype=torch.float32,
                  autocast=None) -> int:
    """FlopCounterMode's FLOPs of one eval forward of ``model`` on a (1, 3, side, side) input (float64
    if ``dtype`` is, else float32) on ``device``, inside ``autocast`` (a context manager) if given."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    from fastswin.ops import flop_formulas

    flop_formulas.register()
    model.eval()
    x = torch.randn(1, 3, side, side, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad(), autocast or contextlib.nullcontext(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def count_macs(model: torch.nn.Module, side: int) -> int:
    return forward_flops(model, side) // 2


def main(argv=None):
    ap = argparse.ArgumentParser(prog="benchmarks.model_macs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="default: all")
    a = ap.parse_args(argv)
    for name in a.model or MODELS:
        side, paper = MODELS[name]
        try:
            model = build(name)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        g = count_macs(model, side) / 1e9
        print(f"{name} @ {side}: {g:.2f} GMACs (paper: {paper} G)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
