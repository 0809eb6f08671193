// fastswin._C: the schemas of every fastswin op (one TORCH_LIBRARY per namespace, so they all live
// here) and the Python module init. Kernels register themselves per device in their own files
// (TORCH_LIBRARY_IMPL(fastswin, CPU|CUDA, m)); fake kernels and autograd are registered from
// Python in fastswin/ops/.
//
// <torch/extension.h> is included here only: it is slow to compile.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastswin, m) {
  // DAT's bilinear sampling (fastswin/reference/bilinear.py):
  //   feat (N, C, H, W), pos (N, Hk, Wk, 2) in (y, x) order, normalized to [-1, 1],
  //   align_corners=True, zero padding  ->  (N, C, Hk, Wk)
  m.def("bilinear_sample(Tensor feat, Tensor pos) -> Tensor", {at::Tag::pt2_compliant_tag});
  // Returns (grad_feat (N, C, H, W), grad_pos (N, Hk, Wk, 2)). A gradient whose *_requires_grad
  // flag is false is returned as an empty tensor of shape (0,) rather than an undefined one, so
  // the outputs are always real tensors (simple fake kernels, no optional outputs).
  // deterministic=True: no atomics (bitwise reproducible); the CPU kernel is always deterministic.
  m.def(
      "bilinear_sample_backward(Tensor grad_out, Tensor feat, Tensor pos, bool feat_requires_grad, "
      "bool pos_requires_grad, bool deterministic) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastswin compiled ops; importing registers torch.ops.fastswin.*";
  m.def(
      "cuda_built",
      []() {
#ifdef FASTSWIN_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True iff this build contains the CUDA kernels (compiled with -DFASTSWIN_WITH_CUDA).");
}
