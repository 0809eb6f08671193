// CPU kernels of fastswin::bilinear_sample and fastswin::bilinear_sample_backward.
//
// Formula, shapes and NaN / Inf positions: bilinear_sample.h. All four float dtypes; half types accumulate in float,
// double in double (at::opmath_type). Inputs may have any strides: they are made contiguous
// first (opcheck passes an expanded, stride-0 grad_out).
//
// The backward is deterministic and free of atomics whatever `deterministic` says:
//   grad_feat: parallel over (n, c) planes; each plane walks its Hk*Wk samples serially and
//              scatters into its own plane (no other task touches it);
//   grad_pos:  parallel over (n, sample); each sample loops over the C channels serially.
#include "bilinear_sample/bilinear_sample.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace fastswin {

namespace {
std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}
}  // namespace

void check_bilinear_sample_inputs(const at::Tensor& feat, const at::Tensor& pos) {
  TORCH_CHECK(feat.defined(), "fastswin::bilinear_sample: feat: expected a tensor, got None");
  TORCH_CHECK(pos.defined(), "fastswin::bilinear_sample: pos: expected a tensor, got None");
  TORCH_CHECK(feat.dim() == 4, "fastswin::bilinear_sample: feat: expected a 4-D tensor (N, C, H, W), got shape ",
              shape_str(feat));
  TORCH_CHECK(pos.dim() == 4, "fastswin::bilinear_sample: pos: expected a 4-D tensor (N, Hk, Wk, 2), got shape ",
              shape_str(pos));
  TORCH_CHECK(pos.size(3) == 2, "fastswin::bilinear_sample: pos: expected size 2 in the last dimension ((y, x)), got shape ",
              shape_str(pos));
  TORCH_CHECK(pos.size(0) == feat.size(0), "fastswin::bilinear_sample: pos: expected batch size ", feat.size(0),
              " (the N of feat), got shape ", shape_str(pos));
  TORCH_CHECK(at::isFloatingType(feat.scalar_type()),
              "fastswin::bilinear_sample: feat: expected a floating dtype (float64, float32, float16, bfloat16), got ",
              feat.scalar_type());
  TORCH_CHECK(pos.scalar_type() == feat.scalar_type(), "fastswin::bilinear_sample: pos: expected dtype ",
              feat.scalar_type(), " (the dtype of feat), got ", pos.scalar_type());
  TORCH_CHECK(pos.device() == feat.device(), "fastswin::bilinear_sample: pos: expected device ", feat.device(),
              " (the device of feat), got ", pos.device());
  TORCH_CHECK(feat.size(2) >= 1 && feat.size(3) >= 1,
              "fastswin::bilinear_sample: feat: expected H >= 1 and W >= 1, got shape ", shape_str(feat));
}

void check_bilinear_sample_grad(const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& pos) {
  check_bilinear_sample_inputs(feat, pos);
  TORCH_CHECK(grad_out.defined(), "fastswin::bilinear_sample_backward: grad_out: expected a tensor, got None");
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == feat.size(0) && grad_out.size(1) == feat.size(1) &&
                  grad_out.size(2) == pos.size(1) && grad_out.size(3) == pos.size(2),
              "fastswin::bilinear_sample_backward: grad_out: expected shape (", feat.size(0), ", ", feat.size(1), ", ",
              pos.size(1), ", ", pos.size(2), ") (N, C, Hk, Wk), got shape ", shape_str(grad_out));
  TORCH_CHECK(grad_out.scalar_type() == feat.scalar_type(), "fastswin::bilinear_sample_backward: grad_out: expected dtype ",
              feat.scalar_type(), " (the dtype of feat), got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == feat.device(), "fastswin::bilinear_sample_backward: grad_out: expected device ",
              feat.device(), " (the device of feat), got ", grad_out.device());
}

namespace {

using bilinear::Taps;

// Work items per parallel_for task: at::internal::GRAIN_SIZE's value, without relying on the
// header that happens to define it.
constexpr int64_t kGrain = 32768;

// Samples per forward task: their taps (computed once) stay in L1 while the task loops over the
// C channels.
constexpr int64_t kChunk = 64;

at::Tensor bilinear_sample_cpu(const at::Tensor& feat_in, const at::Tensor& pos_in) {
  check_bilinear_sample_inputs(feat_in, pos_in);
  const at::Tensor feat = feat_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const int64_t N = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const int64_t Hk = pos.size(1), Wk = pos.size(2), K = Hk * Wk;
  at::Tensor out = at::empty({N, C, Hk, Wk}, feat.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "bilinear_sample_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* f = feat.const_data_ptr<scalar_t>();
    const scalar_t* p = pos.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // One task per (n, chunk of kChunk samples): the taps of its samples are computed once, then
    // each channel c reads plane (n, c) of feat and writes a contiguous run of out[n, c].
    const int64_t chunks = (K + kChunk - 1) / kChunk;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, kChunk * C));
    at::parallel_for(0, N * chunks, grain, [&](int64_t begin, int64_t end) {
      Taps<opmath_t> taps[kChunk];
      bool has[kChunk], interior[kChunk];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / chunks;
        const int64_t k0 = (task % chunks) * kChunk;
        const int64_t len = std::min(kChunk, K - k0);
        const scalar_t* pk = p + (n * K + k0) * 2;
        for (int64_t j = 0; j < len; ++j) {
          has[j] = taps[j].init_at(pk + 2 * j, H, W);
          interior[j] = has[j] && taps[j].interior();
        }
        for (int64_t c = 0; c < C; ++c) {
          const int64_t nc = n * C + c;
          const scalar_t* plane = f + nc * H * W;
          scalar_t* orow = o + nc * K + k0;
          for (int64_t j = 0; j < len; ++j) {
            // Interior samples (most of DAT's) skip the four per-tap bounds tests.
            const opmath_t v = interior[j] ? taps[j].sample_interior(plane, W) : taps[j].value(has[j], plane, W);
            orow[j] = static_cast<scalar_t>(v);
          }
        }
      }
    });
  });
  return out;
}

// Returns (grad_feat, grad_pos). A gradient that is not asked for comes back as an empty tensor of
// shape (0,) (always a tensor, so the schema and fake kernels need no optional outputs).
std::tuple<at::Tensor, at::Tensor> bilinear_sample_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& feat_in,
                                                                const at::Tensor& pos_in, bool feat_requires_grad,
                                                                bool pos_requires_grad, bool /*deterministic*/) {
  // `deterministic` is ignored: this CPU backward is always deterministic (see the file comment).
  check_bilinear_sample_grad(grad_out_in, feat_in, pos_in);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor feat = feat_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const int64_t N = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const int64_t K = pos.size(1) * pos.size(2);

  at::Tensor grad_feat = at::empty({0}, feat.options());
  at::Tensor grad_pos = at::empty({0}, pos.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "bilinear_sample_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* f = feat.const_data_ptr<scalar_t>();
    const scalar_t* p = pos.const_data_ptr<scalar_t>();

    if (feat_requires_grad) {
      // Accumulate in opmath_t (a float buffer for half types, cast once at the end).
      constexpr auto acc_type = c10::CppTypeToScalarType<opmath_t>::value;
      at::Tensor acc = at::zeros(feat.sizes(), feat.options().dtype(acc_type));
      opmath_t* a = acc.mutable_data_ptr<opmath_t>();
      const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, 8 * K));
      at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
          bilinear::scatter_plane(a + nc * H * W, g + nc * K, p + (nc / C) * K * 2, K, H, W);
        }
      });
      grad_feat = acc_type == feat.scalar_type() ? acc : acc.to(feat.scalar_type());
    }

    if (pos_requires_grad) {
      grad_pos = at::empty(pos.sizes(), pos.options());
      scalar_t* gp = grad_pos.mutable_data_ptr<scalar_t>();
      const opmath_t gx_mult = bilinear::unnormalize_grad<opmath_t>(W);
      const opmath_t gy_mult = bilinear::unnormalize_grad<opmath_t>(H);
      const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, 8 * C));
      at::parallel_for(0, N * K, grain, [&](int64_t begin, int64_t end) {
        for (int64_t nk = begin; nk < end; ++nk) {
          const int64_t n = nk / K, k = nk % K;
          opmath_t gix = opmath_t(0), giy = opmath_t(0);
          Taps<opmath_t> t;
          if (t.init_at(p + 2 * nk, H, W)) {
            for (int64_t c = 0; c < C; ++c) {
              const int64_t nc = n * C + c;
              t.add_coord_grad(f + nc * H * W, W, static_cast<opmath_t>(g[nc * K + k]), gix, giy);
            }
          } else if (C > 0) {
            t.add_outside_coord_grad(gix, giy);  // NaN for a non-finite coordinate (header)
          }
          gp[2 * nk] = static_cast<scalar_t>(gy_mult * giy);  // DAT's order: (y, x)
          gp[2 * nk + 1] = static_cast<scalar_t>(gx_mult * gix);
        }
      });
    }
  });
  return std::make_tuple(grad_feat, grad_pos);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastswin, CPU, m) {
  m.impl("bilinear_sample", &bilinear_sample_cpu);
  m.impl("bilinear_sample_backward", &bilinear_sample_backward_cpu);
}

}  // namespace fastswin
