// CUDA kernels of fastswin::bilinear_sample and fastswin::bilinear_sample_backward.
//
// Formula, shapes and NaN / Inf positions: bilinear_sample.h (shared with the CPU kernels,
// grid_sample's arithmetic; the per-element forward and the per-plane scatter live there too).
// feat (N, C, H, W), pos (N, K = Hk*Wk, 2) in (y, x) order, out / grad_out (N, C, K); all made
// contiguous first. Offsets are int64 (N*C*H*W and N*C*K may exceed 2^31), except in the
// forward's int32 instantiation, used only when every offset fits.
//
// Forward: one thread per output element, threads ordered like out (n, c, k), k fastest.
//   Why not one thread per (n, sample) looping over channels (grid_sample's choice): DAT samples
//   few points per group (N*K is often a few thousand), which would leave most of an H100 idle,
//   while N*C*K is large; consecutive threads write consecutive outputs and read consecutive pos
//   entries (coalesced), and the gathers of a warp hit a small window of one (n, c) plane. The
//   price is recomputing the 4 weights per channel: ~20 flops next to 4 gathers, L1-resident pos.
//
// Backward, fast (default): one kernel, blocks of kSamples x kSplit threads. threadIdx.x walks 32
//   consecutive samples of one n (coalesced pos / grad_out reads), threadIdx.y one of kSplit
//   channel slices (c = ty, ty + kSplit, ...). Each thread
//     - scatters into grad_feat with atomicAdd (into a float buffer for fp16/bf16, then one cast:
//       fp32 atomics are native and keep the sum accurate);
//     - accumulates d/d(ix, iy) over its channels in registers; the kSplit partial sums of a
//       sample are added in shared memory in a fixed order: grad_pos needs no global atomics.
// Backward, deterministic (torch.use_deterministic_algorithms(True)): no atomics at all.
//     - grad_feat: one thread per (n, c) plane, walking the K samples serially and updating its
//       own plane (nobody else writes it) -> the summation order is fixed;
//     - grad_pos: the same sample kernel as the fast path with the grad_feat scatter compiled
//       out. Its reduction (serial over each thread's channels, then a fixed-order sum of the
//       kSplit partials in shared memory) is already deterministic, and kSplit x more parallel
//       than one thread per sample looping over all C channels.
#include "bilinear_sample/bilinear_sample.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace fastswin {
namespace {

using bilinear::Taps;

constexpr int kForwardThreads = 256;
constexpr int kSamples = 32;  // blockDim.x of the backward sample kernel: one warp of samples
constexpr int kSplit = 8;     // blockDim.y: channel slices per sample
constexpr int kPlaneThreads = 128;
// Grid-stride loops cover anything beyond this many blocks.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// index_t: int32_t when every element offset of feat and out fits (the three integer divisions
// per element are then 32-bit, several times cheaper than 64-bit ones), int64_t otherwise.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kForwardThreads)
    bilinear_sample_forward_kernel(const scalar_t* __restrict__ feat, const scalar_t* __restrict__ pos,
                                   scalar_t* __restrict__ out, index_t total, index_t C, index_t H, index_t W,
                                   index_t K) {
  using opmath_t = at::opmath_type<scalar_t>;
  // The loop variable is int64 so that idx + stride cannot overflow index_t.
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const index_t idx = static_cast<index_t>(i);
    const index_t k = idx % K;
    const index_t nc = idx / K;
    const index_t n = nc / C;
    out[idx] = static_cast<scalar_t>(
        bilinear::sample_element<opmath_t>(feat + nc * H * W, pos + (n * K + k) * 2, H, W));
  }
}

// grid: N * blocks_per_n blocks of (kSamples, kSplit) threads; block b serves batch n = b /
// blocks_per_n and samples (b % blocks_per_n) * kSamples + [0, kSamples).
// kFeatGrad: atomically scatter into grad_feat_acc (N, C, H, W) (opmath_t, zero-initialized).
// kPosGrad: write grad_pos (N, K, 2).
template <typename scalar_t, bool kFeatGrad, bool kPosGrad>
__global__ void __launch_bounds__(kSamples* kSplit)
    bilinear_sample_backward_sample_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ feat,
                                           const scalar_t* __restrict__ pos,
                                           at::opmath_type<scalar_t>* __restrict__ grad_feat_acc,
                                           scalar_t* __restrict__ grad_pos, int64_t C, int64_t H, int64_t W,
                                           int64_t K, int64_t blocks_per_n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n = int64_t(blockIdx.x) / blocks_per_n;
  const int64_t k = (int64_t(blockIdx.x) % blocks_per_n) * kSamples + threadIdx.x;
  opmath_t gix = opmath_t(0), giy = opmath_t(0);

  // No early return: every thread must reach __syncthreads() below.
  if (k < K) {
    Taps<opmath_t> t;
    if (t.init_at(pos + (n * K + k) * 2, H, W)) {
      const int64_t HW = H * W;
      for (int64_t c = threadIdx.y; c < C; c += kSplit) {
        const int64_t nc = n * C + c;
        const opmath_t g = static_cast<opmath_t>(grad_out[nc * K + k]);
        if constexpr (kFeatGrad) {
          const int64_t o = nc * HW + t.offset(W);
          if (t.in_y0 && t.in_x0) gpuAtomicAdd(grad_feat_acc + o, t.nw * g);
          if (t.in_y0 && t.in_x1) gpuAtomicAdd(grad_feat_acc + o + 1, t.ne * g);
          if (t.in_y1 && t.in_x0) gpuAtomicAdd(grad_feat_acc + o + W, t.sw * g);
          if (t.in_y1 && t.in_x1) gpuAtomicAdd(grad_feat_acc + o + W + 1, t.se * g);
        }
        if constexpr (kPosGrad) {
          t.add_coord_grad(feat + nc * HW, W, g, gix, giy);
        }
      }
    } else if (kPosGrad && threadIdx.y < C) {
      // No tap: d/d(ix, iy) is 0, or NaN for a non-finite coordinate (bilinear_sample.h), in
      // every thread that owns a channel, so the shared-memory sum below carries it.
      t.add_outside_coord_grad(gix, giy);
    }
  }

  if constexpr (kPosGrad) {
    __shared__ opmath_t s_gix[kSplit][kSamples];
    __shared__ opmath_t s_giy[kSplit][kSamples];
    s_gix[threadIdx.y][threadIdx.x] = gix;
    s_giy[threadIdx.y][threadIdx.x] = giy;
    __syncthreads();
    if (threadIdx.y == 0 && k < K) {
      opmath_t sx = s_gix[0][threadIdx.x], sy = s_giy[0][threadIdx.x];
#pragma unroll
      for (int s = 1; s < kSplit; ++s) {
        sx += s_gix[s][threadIdx.x];
        sy += s_giy[s][threadIdx.x];
      }
      scalar_t* gp = grad_pos + (n * K + k) * 2;
      gp[0] = static_cast<scalar_t>(bilinear::unnormalize_grad<opmath_t>(H) * sy);  // DAT's order: (y, x)
      gp[1] = static_cast<scalar_t>(bilinear::unnormalize_grad<opmath_t>(W) * sx);
    }
  }
}

// Deterministic grad_feat: one thread per (n, c) plane, samples in order, plain read-modify-write
// into its own plane of grad_feat_acc (opmath_t, zero-initialized).
template <typename scalar_t>
__global__ void __launch_bounds__(kPlaneThreads)
    bilinear_sample_backward_plane_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ pos,
                                          at::opmath_type<scalar_t>* __restrict__ grad_feat_acc, int64_t NC,
                                          int64_t C, int64_t H, int64_t W, int64_t K) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t nc = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; nc < NC; nc += stride) {
    bilinear::scatter_plane(grad_feat_acc + nc * H * W, grad_out + nc * K, pos + (nc / C) * K * 2, K, H, W);
  }
}

at::Tensor bilinear_sample_cuda(const at::Tensor& feat_in, const at::Tensor& pos_in) {
  check_bilinear_sample_inputs(feat_in, pos_in);
  c10::cuda::CUDAGuard guard(feat_in.device());
  const at::Tensor feat = feat_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const int64_t N = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const int64_t Hk = pos.size(1), Wk = pos.size(2), K = Hk * Wk;
  at::Tensor out = at::empty({N, C, Hk, Wk}, feat.options());
  const int64_t total = out.numel();
  if (total == 0) return out;

  const int64_t blocks = std::min(ceil_div(total, kForwardThreads), kMaxBlocks);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  const bool use32 = total <= kInt32Max && feat.numel() <= kInt32Max && pos.numel() <= kInt32Max;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "bilinear_sample_cuda", [&] {
    const scalar_t* f = feat.const_data_ptr<scalar_t>();
    const scalar_t* p = pos.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const unsigned int grid = static_cast<unsigned int>(blocks);
    if (use32) {
      bilinear_sample_forward_kernel<scalar_t, int32_t><<<grid, kForwardThreads, 0, stream>>>(
          f, p, o, static_cast<int32_t>(total), static_cast<int32_t>(C), static_cast<int32_t>(H),
          static_cast<int32_t>(W), static_cast<int32_t>(K));
    } else {
      bilinear_sample_forward_kernel<scalar_t, int64_t><<<grid, kForwardThreads, 0, stream>>>(f, p, o, total, C, H, W, K);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Returns (grad_feat, grad_pos); a gradient not asked for is an empty (0,) tensor (csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor> bilinear_sample_backward_cuda(const at::Tensor& grad_out_in,
                                                                 const at::Tensor& feat_in, const at::Tensor& pos_in,
                                                                 bool feat_requires_grad, bool pos_requires_grad,
                                                                 bool deterministic) {
  check_bilinear_sample_grad(grad_out_in, feat_in, pos_in);
  c10::cuda::CUDAGuard guard(feat_in.device());
  // contiguous(): opcheck / autograd may hand an expanded (stride-0) grad_out.
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor feat = feat_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const int64_t N = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const int64_t K = pos.size(1) * pos.size(2);

  at::Tensor grad_feat = at::empty({0}, feat.options());
  at::Tensor grad_pos = at::empty({0}, pos.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "bilinear_sample_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr auto acc_type = c10::CppTypeToScalarType<opmath_t>::value;
    at::Tensor acc;
    opmath_t* acc_ptr = nullptr;
    if (feat_requires_grad) {
      acc = at::zeros(feat.sizes(), feat.options().dtype(acc_type));
      acc_ptr = acc.mutable_data_ptr<opmath_t>();
    }
    scalar_t* gp_ptr = nullptr;
    if (pos_requires_grad) {
      grad_pos = at::empty(pos.sizes(), pos.options());
      gp_ptr = grad_pos.mutable_data_ptr<scalar_t>();
    }
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* f = feat.const_data_ptr<scalar_t>();
    const scalar_t* p = pos.const_data_ptr<scalar_t>();

    const int64_t blocks_per_n = ceil_div(K, kSamples);
    const int64_t sample_blocks = N * blocks_per_n;
    TORCH_CHECK(sample_blocks <= std::numeric_limits<int32_t>::max(),
                "fastswin::bilinear_sample_backward: pos: too many samples (N * ceil(Hk*Wk / 32) = ", sample_blocks,
                " blocks)");
    const dim3 sample_block(kSamples, kSplit);
    const dim3 sample_grid(static_cast<unsigned int>(sample_blocks));
    const bool any_samples = sample_blocks > 0;

    if (deterministic) {
      if (pos_requires_grad && any_samples) {
        bilinear_sample_backward_sample_kernel<scalar_t, false, true>
            <<<sample_grid, sample_block, 0, stream>>>(g, f, p, nullptr, gp_ptr, C, H, W, K, blocks_per_n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (feat_requires_grad && N * C > 0 && K > 0) {
        const int64_t blocks = std::min(ceil_div(N * C, kPlaneThreads), kMaxBlocks);
        bilinear_sample_backward_plane_kernel<scalar_t>
            <<<static_cast<unsigned int>(blocks), kPlaneThreads, 0, stream>>>(g, p, acc_ptr, N * C, C, H, W, K);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else if (any_samples) {
      if (feat_requires_grad && pos_requires_grad) {
        bilinear_sample_backward_sample_kernel<scalar_t, true, true>
            <<<sample_grid, sample_block, 0, stream>>>(g, f, p, acc_ptr, gp_ptr, C, H, W, K, blocks_per_n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (feat_requires_grad) {
        bilinear_sample_backward_sample_kernel<scalar_t, true, false>
            <<<sample_grid, sample_block, 0, stream>>>(g, f, p, acc_ptr, nullptr, C, H, W, K, blocks_per_n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (pos_requires_grad) {
        bilinear_sample_backward_sample_kernel<scalar_t, false, true>
            <<<sample_grid, sample_block, 0, stream>>>(g, f, p, nullptr, gp_ptr, C, H, W, K, blocks_per_n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (feat_requires_grad) {
      grad_feat = acc_type == feat.scalar_type() ? acc : acc.to(feat.scalar_type());
    }
  });
  return std::make_tuple(grad_feat, grad_pos);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastswin, CUDA, m) {
  m.impl("bilinear_sample", &bilinear_sample_cuda);
  m.impl("bilinear_sample_backward", &bilinear_sample_backward_cuda);
}

}  // namespace fastswin
