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

  // Swin V1 / V2 window attention, CUDA only (csrc/window_attention/window_attention_cuda.cu; no
  // CPU kernel: calls on CPU tensors raise the dispatcher's "no kernel for CPU" error). Semantics
  // are those of the Triton ops (kernels/window_attention.py). One op serves V1 and V2:
  //   scale (heads,) fp32: the per-head logit multiplier -- V1's scale (default head_dim**-0.5)
  //     repeated, or V2's exp(min(logit_scale, log 100)); cosine=True: V2 (q and k L2-normalised,
  //     rel_pos_table is then 16*sigmoid(cpb output)).
  //   q, k, v (B*nW, heads, N, head_dim) any strides, N = window_h*window_w; rel_pos_table
  //     ((2*window_h-1)*(2*window_w-1), heads); mask (nW, N, N) additive, window b uses b % nW.
  //   out (B*nW, heads, N, head_dim) contiguous; lse (B*nW, heads, N) float32.
  //   dtypes float16, bfloat16, float32 (q, k, v, dout, out share one); head_dim 1..128.
  // Backward: gradients not asked for (need_dtable=False; dscale when cosine=False) come back as
  // empty (0,) tensors. dscale is the gradient of the multiplier (heads,). deterministic=True:
  // no atomics (the table gradient is then bitwise reproducible).
  m.def(
      "window_attention_cuda_fwd(Tensor q, Tensor k, Tensor v, Tensor rel_pos_table, int window_h, "
      "int window_w, Tensor? mask, Tensor scale, bool cosine) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "window_attention_cuda_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor rel_pos_table, Tensor out, "
      "Tensor lse, int window_h, int window_w, Tensor? mask, Tensor scale, bool cosine, bool need_dtable, "
      "bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dtable, Tensor dscale)",
      {at::Tag::pt2_compliant_tag});
  // Block level (timm SwinTransformer(V2)Block._attn between the qkv linear and proj): qkv
  // (B, H, W, 3, heads, head_dim) any strides, before any roll; roll by -shift, pad bottom/right to
  // window multiples (padded tokens take pad_qkv (3, heads, head_dim), zeros if None), partition,
  // -100 shift mask on the padded size, all in the kernels' addressing; out (B, H, W, heads*head_dim)
  // contiguous, un-shifted; lse (B*nW, heads, N) float32 over the padded grid's windows.
  // dpad_qkv: (3, heads, head_dim) (row 0 is 0), empty (0,) when not asked for or pad_qkv is None.
  m.def(
      "shifted_window_attention_cuda_fwd(Tensor qkv, Tensor rel_pos_table, int window_h, int window_w, "
      "int shift_h, int shift_w, Tensor? pad_qkv, Tensor scale, bool cosine) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "shifted_window_attention_cuda_bwd(Tensor dout, Tensor qkv, Tensor rel_pos_table, Tensor out, Tensor lse, "
      "int window_h, int window_w, int shift_h, int shift_w, Tensor? pad_qkv, Tensor scale, bool cosine, "
      "bool need_dtable, bool need_dpad, bool deterministic) -> (Tensor dqkv, Tensor dtable, Tensor dpad_qkv, "
      "Tensor dscale)",
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
