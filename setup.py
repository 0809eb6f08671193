"""Build of fastswin.

* Python packages: ``fastswin`` and ``fastswin.kernels`` (the Triton kernels live in ``kernels/``
  and are installed under ``fastswin`` because a top-level ``kernels`` package exists on PyPI).
* Extension ``fastswin._C``: the C++ CPU sources in ``csrc/`` always, the CUDA sources
  (``csrc/**/*.cu``) when a CUDA toolkit and a CUDA build of torch are present.

Environment:

``FASTSWIN_BUILD_CUDA=0|1``
    Force the CUDA sources off or on (on: fail loudly if no toolkit / no CUDA torch).
``CUDA_HOME``
    The CUDA toolkit's own folder (torch's guess from ``nvcc``'s location can be wrong).
``TORCH_CUDA_ARCH_LIST``
    Target GPUs; defaults to ``9.0`` (H100/H200) when no GPU is visible at build time.
``FASTSWIN_EXTRA_INCLUDE``
    Extra include folders (``os.pathsep``-separated), e.g. the ``nvidia`` cu13 wheel's
    ``include`` for the cuSPARSE headers that torch's CUDA headers pull in.

Build with ``pip install -e . --no-build-isolation`` (torch must already be installed: the
extension is compiled against that exact torch).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v not in ("0", "false", "False", "no")


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))

    want_cuda = _flag("FASTSWIN_BUILD_CUDA")
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda and not cuda_possible:
        raise RuntimeError(
            "FASTSWIN_BUILD_CUDA=1 but the CUDA sources cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}. "
            "Install a CUDA build of torch and set CUDA_HOME to the toolkit folder."
        )
    build_cuda = cuda_possible if want_cuda is None else want_cuda
    if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

    include_dirs = [os.path.join(ROOT, "csrc")]
    include_dirs += [p for p in os.environ.get("FASTSWIN_EXTRA_INCLUDE", "").split(os.pathsep) if p]
    cxx = ["-O3"]
    extra = {"cxx": cxx}
    define_macros = []
    if build_cuda:
        define_macros.append(("FASTSWIN_WITH_CUDA", "1"))
        # No --use_fast_math: the kernels are checked against float64 references.
        extra["nvcc"] = ["-O3", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "fastswin._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastswin._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
        )
    print(f"fastswin: building fastswin._C with CUDA sources: {bool(build_cuda)} "
          f"({len(cpp_sources)} C++ files, {len(cu_sources) if build_cuda else 0} CUDA files)")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="fastswin",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for Swin V1/V2 window attention and DAT deformable attention",
    python_requires=">=3.9",
    packages=[
        "fastswin",
        "fastswin.reference",
        "fastswin.ops",
        "fastswin.modules",
        "fastswin.functional",
        "fastswin.kernels",
    ],
    package_dir={"fastswin.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "pytest-benchmark", "timm", "numpy"]},
)
