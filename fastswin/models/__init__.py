"""Whole backbones built from fastswin's attention layers, checkpoint-compatible with the originals.

* :class:`DAT` -- DAT (CVPR 2022) and DAT++ (LeapLabTHU/DAT), ``variant="dat"|"dat++"``;
  builders :func:`dat_tiny`, :func:`dat_small`, :func:`dat_base`, :func:`dat_pp_tiny`,
  :func:`dat_pp_small`, :func:`dat_pp_base`; configurations in :data:`CONFIGS`.

Swin V1/V2 models are timm's or torchvision's, made fast in place by :func:`fastswin.patch`.
"""
from .dat import DAT, TransformerStage
from .dat_configs import CONFIGS, build, dat_base, dat_pp_base, dat_pp_small, dat_pp_tiny, dat_small, dat_tiny

__all__ = ["DAT", "TransformerStage", "CONFIGS", "build", "dat_tiny", "dat_small", "dat_base",
           "dat_pp_tiny", "dat_pp_small", "dat_pp_base"]
