// DAT's bilinear sampling: the arithmetic shared by the CPU and CUDA kernels.
//
//   feat (N, C, H, W), pos (N, Hk, Wk, 2) in DAT's (y, x) order, normalized to [-1, 1],
//   align_corners=True, zero padding  ->  out (N, C, Hk, Wk)
//
//   out = F.grid_sample(feat, pos[..., (1, 0)], mode="bilinear", padding_mode="zeros",
//                       align_corners=True)
//
// Every expression below is written the way ATen's grid_sampler_2d writes it (same operations in
// the same order, in at::opmath_type), so fp32/fp64 results agree with F.grid_sample to the last
// bit or nearly so:
//
//   ix = ((x + 1) / 2) * (W - 1)             iy = ((y + 1) / 2) * (H - 1)
//   x0 = floor(ix), y0 = floor(iy)           (the north-west tap; x1 = x0 + 1, y1 = y0 + 1)
//   nw = (x1 - ix) * (y1 - iy)   ne = (ix - x0) * (y1 - iy)
//   sw = (x1 - ix) * (iy - y0)   se = (ix - x0) * (iy - y0)
//   out = nw*f[y0,x0] + ne*f[y0,x1] + sw*f[y1,x0] + se*f[y1,x1]    (taps off the map read 0)
//
//   d out/d ix = (y1-iy)*(f[y0,x1]-f[y0,x0]) + (iy-y0)*(f[y1,x1]-f[y1,x0])
//   d out/d iy = (x1-ix)*(f[y1,x0]-f[y0,x0]) + (ix-x0)*(f[y1,x1]-f[y0,x1])
//   d ix/d x = (W - 1) / 2,  d iy/d y = (H - 1) / 2
//
// A sample with ix outside [-1, W) or iy outside [-1, H) (NaN / Inf included) has no tap on the
// map. A finite one reads 0 and gets a zero gradient. Testing this *before* the float -> int
// conversion of floor(ix) keeps huge or non-finite positions free of undefined behaviour.
//
// NaN / Inf positions follow the CPU grid_sample of float32/float64 (ATen's vectorized
// grid_sampler_2d_cpu_kernel, whose weights 1 - (ix - floor(ix)) etc. turn NaN while its masked
// gathers read 0): if the unnormalized ix or iy is not finite (a NaN/Inf coordinate, or a finite one
// whose unnormalization overflows),
//   out       = NaN in every channel;
//   grad_feat = no contribution (the sample touches no tap);
//   grad_pos  = d/dx is NaN iff iy is not finite, d/dy is NaN iff ix is not finite (the other
//               component is 0: its formula multiplies the zero taps by finite weights), when
//               C >= 1; with C == 0 both are 0 (an empty sum), as in ATen.
// Finite positions with no tap (1e30, -3) read 0 with zero gradients, as in grid_sample.
// Other grid_sample paths may differ: the CUDA one and the CPU scalar fallback (float16 / bfloat16,
// weights in the low precision) convert floor(NaN / Inf) to an integer tap index before their
// bounds test, which is device- or implementation-defined. We follow the float32/float64 CPU rule
// on every device and in every dtype (the half types compute in float).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>

namespace fastswin {
namespace bilinear {

// align_corners=True unnormalization, exactly grid_sampler_unnormalize's expression.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T unnormalize(T coord, int64_t size) {
  return ((coord + T(1)) / T(2)) * static_cast<T>(size - 1);
}

// d(unnormalized)/d(normalized), as grid_sampler_unnormalize_set_grad computes it.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T unnormalize_grad(int64_t size) {
  return static_cast<T>(size - 1) / T(2);
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T floor_(T v) {
#if defined(__CUDA_ARCH__)
  return ::floor(v);
#else
  return std::floor(v);
#endif
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool isfinite_(T v) {
#if defined(__CUDA_ARCH__)
  return ::isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// A quiet NaN of T (constexpr: usable in device code, torch's nvcc flags include
// --expt-relaxed-constexpr).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T nan_() {
  return std::numeric_limits<T>::quiet_NaN();
}

// The four taps of one sample. T is the accumulation type (at::opmath_type<scalar_t>).
template <typename T>
struct Taps {
  int64_t x0, y0;            // north-west tap (may lie one pixel off the map)
  T ix, iy;                  // unnormalized coordinates
  T nw, ne, sw, se;          // bilinear weights
  bool in_x0, in_x1, in_y0, in_y1;  // which tap rows/columns lie on the map
  bool finite_x, finite_y;   // ix / iy are finite (always set)

  // Returns false when no tap lies on the map: the sample reads outside_value() and its gradients
  // come from add_outside_coord_grad(); only ix, iy, finite_x, finite_y are then set.
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool init(T y, T x, int64_t H, int64_t W) {
    ix = unnormalize(x, W);
    iy = unnormalize(y, H);
    finite_x = isfinite_(ix);
    finite_y = isfinite_(iy);
    // floor(ix) in [-1, W-1] <=> -1 <= ix < W. Written so that NaN fails.
    if (!(ix >= T(-1) && ix < static_cast<T>(W) && iy >= T(-1) && iy < static_cast<T>(H))) {
      return false;
    }
    x0 = static_cast<int64_t>(floor_(ix));
    y0 = static_cast<int64_t>(floor_(iy));
    const T fx0 = static_cast<T>(x0), fx1 = static_cast<T>(x0 + 1);
    const T fy0 = static_cast<T>(y0), fy1 = static_cast<T>(y0 + 1);
    nw = (fx1 - ix) * (fy1 - iy);
    ne = (ix - fx0) * (fy1 - iy);
    sw = (fx1 - ix) * (iy - fy0);
    se = (ix - fx0) * (iy - fy0);
    in_x0 = x0 >= 0;           // x0 <= W - 1 is guaranteed by the range test above
    in_x1 = x0 + 1 < W;        // x0 + 1 >= 0 likewise
    in_y0 = y0 >= 0;
    in_y1 = y0 + 1 < H;
    return true;
  }

  // init() from the (y, x) pair yx[0], yx[1] of pos, converted to T.
  template <typename scalar_t>
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool init_at(const scalar_t* yx, int64_t H, int64_t W) {
    return init(static_cast<T>(yx[0]), static_cast<T>(yx[1]), H, W);
  }

  // The value of a sample with no tap on the map: 0, or NaN if ix or iy is not finite.
  C10_HOST_DEVICE C10_ALWAYS_INLINE T outside_value() const {
    return (finite_x && finite_y) ? T(0) : nan_<T>();
  }

  // d out/d(ix, iy) of a sample with no tap on the map, for one or more channels (C >= 1):
  // 0, except that d/dix is NaN if iy is not finite and d/diy is NaN if ix is not finite.
  C10_HOST_DEVICE C10_ALWAYS_INLINE void add_outside_coord_grad(T& gix, T& giy) const {
    if (!finite_y) gix = nan_<T>();
    if (!finite_x) giy = nan_<T>();
  }

  // Offset of the north-west tap in a contiguous (H, W) plane. Only ever used to index taps that
  // lie on the map, so no pointer is formed outside the plane.
  C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t offset(int64_t W) const { return y0 * W + x0; }

  // All four taps lie on the map (after a true init()).
  C10_HOST_DEVICE C10_ALWAYS_INLINE bool interior() const { return in_x0 && in_x1 && in_y0 && in_y1; }

  // sample() for an interior() sample: the same arithmetic, without the per-tap tests.
  template <typename scalar_t>
  C10_HOST_DEVICE C10_ALWAYS_INLINE T sample_interior(const scalar_t* plane, int64_t W) const {
    const int64_t o = offset(W);
    T acc = T(0);
    acc += static_cast<T>(plane[o]) * nw;
    acc += static_cast<T>(plane[o + 1]) * ne;
    acc += static_cast<T>(plane[o + W]) * sw;
    acc += static_cast<T>(plane[o + W + 1]) * se;
    return acc;
  }

  // Interpolated value of one contiguous (H, W) plane, accumulated in T in grid_sample's order
  // (nw, ne, sw, se).
  template <typename scalar_t>
  C10_HOST_DEVICE C10_ALWAYS_INLINE T sample(const scalar_t* plane, int64_t W) const {
    const int64_t o = offset(W);
    T acc = T(0);
    if (in_y0 && in_x0) acc += static_cast<T>(plane[o]) * nw;
    if (in_y0 && in_x1) acc += static_cast<T>(plane[o + 1]) * ne;
    if (in_y1 && in_x0) acc += static_cast<T>(plane[o + W]) * sw;
    if (in_y1 && in_x1) acc += static_cast<T>(plane[o + W + 1]) * se;
    return acc;
  }

  // The output of one plane: sample() if init() found taps (has_taps), else outside_value().
  template <typename scalar_t>
  C10_HOST_DEVICE C10_ALWAYS_INLINE T value(bool has_taps, const scalar_t* plane, int64_t W) const {
    return has_taps ? sample(plane, W) : outside_value();
  }

  // Adds g * d out/d(ix, iy) for one channel to (gix, giy), in grid_sample's order.
  template <typename scalar_t>
  C10_HOST_DEVICE C10_ALWAYS_INLINE void add_coord_grad(const scalar_t* plane, int64_t W, T g, T& gix,
                                                        T& giy) const {
    const int64_t o = offset(W);
    const T fx0 = static_cast<T>(x0), fx1 = static_cast<T>(x0 + 1);
    const T fy0 = static_cast<T>(y0), fy1 = static_cast<T>(y0 + 1);
    if (in_y0 && in_x0) {
      const T v = static_cast<T>(plane[o]);
      gix -= v * (fy1 - iy) * g;
      giy -= v * (fx1 - ix) * g;
    }
    if (in_y0 && in_x1) {
      const T v = static_cast<T>(plane[o + 1]);
      gix += v * (fy1 - iy) * g;
      giy -= v * (ix - fx0) * g;
    }
    if (in_y1 && in_x0) {
      const T v = static_cast<T>(plane[o + W]);
      gix -= v * (iy - fy0) * g;
      giy += v * (fx1 - ix) * g;
    }
    if (in_y1 && in_x1) {
      const T v = static_cast<T>(plane[o + W + 1]);
      gix += v * (iy - fy0) * g;
      giy += v * (ix - fx0) * g;
    }
  }

  // Scatter g * weight into one contiguous (H, W) accumulation plane owned by the caller (no
  // other thread writes it: plain read-modify-write, deterministic).
  C10_HOST_DEVICE C10_ALWAYS_INLINE void scatter(T* plane, int64_t W, T g) const {
    const int64_t o = offset(W);
    if (in_y0 && in_x0) plane[o] += nw * g;
    if (in_y0 && in_x1) plane[o + 1] += ne * g;
    if (in_y1 && in_x0) plane[o + W] += sw * g;
    if (in_y1 && in_x1) plane[o + W + 1] += se * g;
  }
};

// One output element: plane = &feat[n, c], yx = &pos[n, k] (contiguous) -> out[n, c, k] in T.
// The per-element forward of the CUDA kernel.
template <typename T, typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE T sample_element(const scalar_t* plane, const scalar_t* yx, int64_t H, int64_t W) {
  Taps<T> t;
  const bool has_taps = t.init_at(yx, H, W);
  return t.value(has_taps, plane, W);
}

// The gradient of one (n, c) plane of feat, samples in order (deterministic): adds
// sum_k g[k] * weight into acc (H, W), from g = &grad_out[n, c, 0] (K,) and pos_n = &pos[n] (K, 2).
// Nobody else may write acc meanwhile. Used by the CPU backward and the deterministic CUDA one.
template <typename T, typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void scatter_plane(T* acc, const scalar_t* g, const scalar_t* pos_n, int64_t K,
                                                     int64_t H, int64_t W) {
  for (int64_t k = 0; k < K; ++k) {
    Taps<T> t;
    if (t.init_at(pos_n + 2 * k, H, W)) t.scatter(acc, W, static_cast<T>(g[k]));
  }
}

}  // namespace bilinear

// Host-side argument checks shared by the CPU and CUDA entry points (defined in
// bilinear_sample_cpu.cpp, which is always compiled). Messages name the offending argument.
void check_bilinear_sample_inputs(const at::Tensor& feat, const at::Tensor& pos);
void check_bilinear_sample_grad(const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& pos);

}  // namespace fastswin
