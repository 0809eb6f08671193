"""Triton kernels of fastswin, installed as ``fastswin.kernels``.

The folder is called ``kernels/`` in the repository but is installed under ``fastswin`` (see
``package_dir`` in ``setup.py``) because a top-level ``kernels`` package already exists on PyPI.

``TRITON_INTERPRET=1`` must be set before this package is imported for the kernels to run on the
CPU (Triton decides at decoration time).
"""
