// CUDA kernels of the fastswin::*window_attention_cuda_{fwd,bwd} ops (Swin V1 and V2 window
// attention, windowed and block-level entries, forward and backward). Schemas: csrc/ops.cpp.
//
// Same semantics, op boundaries and formulas as the Triton kernels (kernels/window_attention.py,
// whose docstring has the math); summary:
//
//   windowed entry:  q, k, v (BW, H, N, D) any strides; mask (nW, N, N) | None, window b uses
//                    mask[b % nW]; out (BW, H, N, D) contiguous.
//   block entry:     qkv (B, Hi, Wi, 3, H, D) any strides; pad_qkv (3, H, D) | None (a padded
//                    token's q, k, v; zeros if None); out (B, Hi, Wi, H*D) contiguous, written
//                    un-shifted. Window b = (batch, wr, wc) of the padded grid (Hp, Wp); its token
//                    (ih, iw) sits at padded (r, c) = (wr Mh + ih, wc Mw + iw); real iff r < Hi and
//                    c < Wi, then it is source pixel ((r + sh) % Hi, (c + sw) % Wi). With a shift,
//                    -100 between tokens of different timm regions of the padded grid.
//   both:            s = c[h] * <q^, k^> + table[idx(i, j), h] (+ mask) (+ shift mask)
//                    V1: q^ = q, k^ = k, c[h] = scale;  V2 (cosine): q^ = q/max(|q|,1e-12) (fp32,
//                    then rounded to the input dtype), c[h] = exp(min(logit_scale, log 100)).
//                    out = softmax(s) v; lse = log sum exp s (fp32).
//   backward:        p = exp(s - lse); delta = <dout, out>; ds = p (dout v^T - delta);
//                    dq^ = c ds k^, dk^ = c ds^T q^, dv = p^T dout; V2 chains through the
//                    normalisation and dc[h] = sum ds <q^, k^>; dtable[t, h] = sum of ds over
//                    idx(i, j) = t; dpad_qkv = (0, sum of dk, sum of dv over padding tokens).
//
// Structure (flash style, all tiles in shared memory):
//   * one thread block (128 threads, 4 warps) per (window, head, tile of BM queries) in the
//     forward and the dq kernel, per (window, head, tile of BN keys) in the dk/dv kernel; keys
//     (resp. queries) are walked in tiles, so any N (up to 24 x 24 = 576 and beyond) runs with
//     the same tiles; the forward uses an online softmax (fp32 running max / sum / accumulator).
//   * matrix products: block_gemm() below, shared memory -> shared memory (fp32 result).
//     float16 / bfloat16: tensor cores through nvcuda::wmma 16x16x16 fragments with fp32
//     accumulation (sm_80+; older archs compile the FMA loop instead). float32: plain fp32 FMA
//     (IEEE, no tf32, whatever torch.backends.cuda.matmul.allow_tf32 says).
//   * the softmax / score pass is warp-per-row: lanes walk the keys, warp shuffles reduce.
//   * the relative index, the table gather and the shift mask come from per-token coordinates
//     (RowInfo, computed once per tile); no index tensor, no (H, N, N) bias, no mask tensor.
//   * head_dim D is padded to DP = 32, 64 or 128 (template parameter) with zeros.
//   * V1 / V2 and windowed / block are runtime flags (uniform branches): 3 dtypes x 3 DP x 3
//     kernels = 27 instantiations, to keep the 2-core CI build short.
// Backward: wa_bwd_kv_kernel (dk, dv, table-gradient contributions, V2's dc partial sums,
//   pad partial sums; also dq when one key tile covers the window, N <= BN) and wa_bwd_q_kernel
//   (dq, only when N > BN, walking the key tiles: S is recomputed, no atomics on dq).
// Table gradient: default: fp32 atomicAdd into a private row part[b % rows] of a (rows, H, T)
//   buffer (rows = BW up to a 16M-element cap), then one sum over rows -- the atomics only collide
//   within one thread block, their order still varies. Deterministic (flag): no atomics: ds is
//   stored (plain stores, each element once) into a (chunk, H, N, N) buffer, summed over windows
//   in a fixed order chunk by chunk, then gathered into (H, T) by dtab_gather_kernel (one thread
//   per entry, a fixed loop). The dc and pad partials are per-block plain stores summed by torch:
//   deterministic in both modes.
// Offsets into the big tensors are int64 (B*H*W*C may exceed 2^31).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastswin {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Cap (elements) on the table-gradient scratch buffers: 16M fp32 = 64 MB (as the Triton path).
constexpr int64_t kScratchElems = int64_t(1) << 24;

// (batch, row, col, head, dim) strides, in elements, of one of q / k / v / out / dout / dq ...
// Windowed tensors (BW, H, N, D): the token is the "row" and col is unused (stride 0).
struct Str {
  int64_t b, r, c, h, d;
};

// Where one token of a tile lives; filled once per tile by fill_rows().
struct RowInfo {
  int64_t batch;  // batch index (block mode) or window index (windowed mode)
  int sr, sc;     // source row / col (block mode), token / 0 (windowed mode)
  int ih, iw;     // coordinates inside the window (relative position index)
  int rid;        // timm shift-mask region id (0 without shift)
  int valid;      // a token of the window (token index < N)
  int real;       // valid and stored in memory (not a padding token)
};

struct Params {
  int N, MH, MW, H, D, T;
  int n_win, n_win_w;  // windows per image and per image row (block); mask's nW (windowed)
  int img_h, img_w, hp, wp, shift_h, shift_w;
  int block_mode, has_shift, has_mask, cosine;
  const void* q;
  const void* k;
  const void* v;
  Str qs, ks, vs;
  const void* pad;     // (3, H, D) contiguous in the input dtype, or nullptr (zeros)
  const float* table;  // (H, T) fp32
  const float* mask;   // (n_win, N, N) fp32 contiguous, or nullptr
  const float* scale;  // (H,) fp32: V1's scale or V2's exp(min(logit_scale, log 100))
  void* out;           // forward: written; backward: read
  Str os;
  float* lse;  // (BW, H, N)
  const void* dout;
  Str dos;
  void* dq;
  void* dk;
  void* dv;
  Str dqs, dks, dvs;
  float* dtab;  // mode 1: (dtab_rows, H, T); mode 2: (chunk, H, N, N)
  int dtab_mode;
  int dtab_rows;
  int64_t b_start;
  float* dpad_part;  // (BW, H, nblk_n, 2, D) or nullptr
  float* dls_part;   // (BW, H, nblk_n) or nullptr (V1)
  int fuse_dq;
};

// ---- element types -------------------------------------------------------------------------

template <typename scalar_t>
struct Native {
  using type = scalar_t;
};
template <>
struct Native<at::Half> {
  using type = __half;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- tile configuration and shared-memory layouts --------------------------------------------

__host__ __device__ constexpr int tile_rows(int elem_size, int dp) {
  // 64 x 64 tiles where the backward's shared memory stays ~125 kB, 32 x 32 otherwise.
  return (dp <= 32 || (dp <= 64 && elem_size == 2)) ? 64 : 32;
}

inline int padded_dim(int64_t d) { return d <= 32 ? 32 : (d <= 64 ? 64 : 128); }

template <typename T, int DP>
struct Cfg {
  static constexpr int BM = tile_rows(sizeof(T), DP);
  static constexpr int BN = BM;
  static constexpr int kPad = sizeof(T) == 2 ? 8 : 4;  // row padding against bank conflicts
  static constexpr int LDT = DP + kPad;                // T tiles [rows][DP]
  static constexpr int LDP = BN + kPad;                // T tiles [BM][BN]
  static constexpr int LDS = BN + 4;                   // fp32 [BM][BN]
  static constexpr int LDO = DP + 4;                   // fp32 [rows][DP]
  static constexpr int LDX = LDS > LDO ? LDS : LDO;    // fp32 [BM][max(BN, DP)]
  static_assert(BM % 16 == 0 && BN % 16 == 0 && DP % 16 == 0, "wmma tiles are 16 x 16 x 16");
  static_assert(BN % 32 == 0, "the score pass gives each lane BN / 32 keys");
};

// 128-byte aligned offsets (wmma needs 32-byte aligned fragment pointers).
__host__ __device__ constexpr size_t al(size_t x) { return (x + 127) / 128 * 128; }

template <typename T, int DP>
struct FwdLayout {
  using C = Cfg<T, DP>;
  static constexpr size_t q = 0;
  static constexpr size_t k = al(q + sizeof(T) * C::BM * C::LDT);
  static constexpr size_t v = al(k + sizeof(T) * C::BN * C::LDT);
  static constexpr size_t s = al(v + sizeof(T) * C::BN * C::LDT);
  static constexpr size_t p = al(s + sizeof(float) * C::BM * C::LDS);
  static constexpr size_t o = al(p + sizeof(T) * C::BM * C::LDP);
  static constexpr size_t m = al(o + sizeof(float) * C::BM * C::LDO);
  static constexpr size_t l = al(m + sizeof(float) * C::BM);
  static constexpr size_t qrows = al(l + sizeof(float) * C::BM);
  static constexpr size_t krows = al(qrows + sizeof(RowInfo) * C::BM);
  static constexpr size_t bytes = al(krows + sizeof(RowInfo) * C::BN);
};

template <typename T, int DP>
struct KvLayout {
  using C = Cfg<T, DP>;
  static constexpr size_t q = 0;
  static constexpr size_t dout = al(q + sizeof(T) * C::BM * C::LDT);
  static constexpr size_t k = al(dout + sizeof(T) * C::BM * C::LDT);
  static constexpr size_t v = al(k + sizeof(T) * C::BN * C::LDT);
  static constexpr size_t s = al(v + sizeof(T) * C::BN * C::LDT);
  static constexpr size_t x = al(s + sizeof(float) * C::BM * C::LDS);  // dP, then dq^
  static constexpr size_t p = al(x + sizeof(float) * C::BM * C::LDX);
  static constexpr size_t ds = al(p + sizeof(T) * C::BM * C::LDP);
  static constexpr size_t dk = al(ds + sizeof(T) * C::BM * C::LDP);
  static constexpr size_t dv = al(dk + sizeof(float) * C::BN * C::LDO);
  static constexpr size_t lse = al(dv + sizeof(float) * C::BN * C::LDO);
  static constexpr size_t delta = al(lse + sizeof(float) * C::BM);
  static constexpr size_t qinv = al(delta + sizeof(float) * C::BM);
  static constexpr size_t qnrm = al(qinv + sizeof(float) * C::BM);
  static constexpr size_t kinv = al(qnrm + sizeof(float) * C::BM);
  static constexpr size_t knrm = al(kinv + sizeof(float) * C::BN);
  static constexpr size_t red = al(knrm + sizeof(float) * C::BN);
  static constexpr size_t qrows = al(red + sizeof(float) * kWarps);
  static constexpr size_t krows = al(qrows + sizeof(RowInfo) * C::BM);
  static constexpr size_t bytes = al(krows + sizeof(RowInfo) * C::BN);
};

template <typename T, int DP>
struct QLayout {
  using C = Cfg<T, DP>;
  static constexpr size_t q = 0;
  static constexpr size_t dout = al(q + sizeof(T) * C::BM * C::LDT);
  static constexpr size_t k = al(dout + sizeof(T) * C::BM * C::LDT);
  static constexpr size_t v = al(k + sizeof(T) * C::BN * C::LDT);
  static constexpr size_t s = al(v + sizeof(T) * C::BN * C::LDT);
  static constexpr size_t dp = al(s + sizeof(float) * C::BM * C::LDS);
  static constexpr size_t ds = al(dp + sizeof(float) * C::BM * C::LDS);
  static constexpr size_t dq = al(ds + sizeof(T) * C::BM * C::LDP);
  static constexpr size_t lse = al(dq + sizeof(float) * C::BM * C::LDO);
  static constexpr size_t delta = al(lse + sizeof(float) * C::BM);
  static constexpr size_t qinv = al(delta + sizeof(float) * C::BM);
  static constexpr size_t qnrm = al(qinv + sizeof(float) * C::BM);
  static constexpr size_t qrows = al(qnrm + sizeof(float) * C::BM);
  static constexpr size_t krows = al(qrows + sizeof(RowInfo) * C::BM);
  static constexpr size_t bytes = al(krows + sizeof(RowInfo) * C::BN);
};

// ---- device helpers --------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ int64_t offset(const Str& s, const RowInfo& ri, int h, int d) {
  return ri.batch * s.b + int64_t(ri.sr) * s.r + int64_t(ri.sc) * s.c + int64_t(h) * s.h + int64_t(d) * s.d;
}

// timm's region of padded-grid coordinate x: slices [0, -M), [-M, -s), [-s, None); one region
// when s = 0.
__device__ __forceinline__ int region(int x, int size, int window, int shift) {
  return shift > 0 ? int(x >= size - window) + int(x >= size - shift) : 0;
}

// RowInfo of tokens t0 .. t0 + count - 1 of window b.
__device__ void fill_rows(const Params& p, int64_t b, int t0, int count, RowInfo* rows) {
  for (int r = threadIdx.x; r < count; r += kThreads) {
    const int t = t0 + r;
    RowInfo ri;
    ri.valid = t < p.N;
    const int tt = ri.valid ? t : 0;
    ri.ih = tt / p.MW;
    ri.iw = tt % p.MW;
    if (p.block_mode) {
      const int64_t w = b % p.n_win;
      ri.batch = b / p.n_win;
      const int rr = int(w / p.n_win_w) * p.MH + ri.ih;
      const int cc = int(w % p.n_win_w) * p.MW + ri.iw;
      ri.real = ri.valid && rr < p.img_h && cc < p.img_w;
      ri.sr = (rr + p.shift_h) % p.img_h;
      ri.sc = (cc + p.shift_w) % p.img_w;
      ri.rid = p.has_shift ? region(rr, p.hp, p.MH, p.shift_h) * 3 + region(cc, p.wp, p.MW, p.shift_w) : 0;
    } else {
      ri.batch = b;
      ri.sr = tt;
      ri.sc = 0;
      ri.real = ri.valid;
      ri.rid = 0;
    }
    rows[r] = ri;
  }
}

// (nrows, DP) tile of x (head h) into shared memory: real tokens from memory, padding tokens
// from pad_row (zeros when nullptr), tokens outside the window and columns >= D as zeros.
template <typename T, int DP>
__device__ void load_tile(T* dst, int ld, const T* __restrict__ src, const Str& s, const RowInfo* rows, int nrows,
                          int h, int D, const T* __restrict__ pad_row) {
  for (int e = threadIdx.x; e < nrows * DP; e += kThreads) {
    const int r = e / DP, d = e % DP;
    T x = from_f<T>(0.f);
    if (d < D) {
      const RowInfo& ri = rows[r];
      if (ri.real) {
        x = src[offset(s, ri, h, d)];
      } else if (ri.valid && pad_row != nullptr) {
        x = pad_row[d];
      }
    }
    dst[r * ld + d] = x;
  }
}

// F.normalize of each row in place (fp32 math, result rounded to T); optionally keeps
// 1 / max(|x|, eps) and |x| per row.
template <typename T, int DP>
__device__ void normalize_rows(T* x, int ld, int nrows, float* inv_out, float* nrm_out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < nrows; r += kWarps) {
    float ss = 0.f;
    for (int d = lane; d < DP; d += 32) {
      const float v = to_f(x[r * ld + d]);
      ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    const float nrm = sqrtf(ss);
    const float inv = 1.f / fmaxf(nrm, 1e-12f);  // F.normalize's eps
    for (int d = lane; d < DP; d += 32) x[r * ld + d] = from_f<T>(to_f(x[r * ld + d]) * inv);
    if (lane == 0 && inv_out != nullptr) {
      inv_out[r] = inv;
      nrm_out[r] = nrm;
    }
  }
}

// Logit of query token qi (token index i) against key token kj (index j) from dot = <q^, k^>;
// -inf for keys outside the window. idx: the table index.
__device__ __forceinline__ float score(const Params& p, float dot, float c, int h, int64_t b, const RowInfo& qi,
                                       const RowInfo& kj, int i, int j, int& idx) {
  idx = (qi.ih - kj.ih + p.MH - 1) * (2 * p.MW - 1) + (qi.iw - kj.iw + p.MW - 1);
  if (!kj.valid) return -INFINITY;
  float s = dot * c;
  s += p.table[h * p.T + idx];
  if (p.has_mask) s += p.mask[((b % p.n_win) * p.N + i) * int64_t(p.N) + j];
  if (p.has_shift && qi.rid != kj.rid) s += -100.f;  // timm's get_attn_mask value
  return s;
}

// C (fp32, [M][ldc]) = (ACC ? C : 0) + opA(A) opB(B) with opA(A) M x K and opB(B) K x N:
//   A_T = false: A stored [M][lda] (element (m, k) at A[m lda + k]); true: stored [K][lda] (A[k lda + m]).
//   B_T = false: B stored [K][ldb] (element (k, n) at B[k ldb + n]); true: stored [N][ldb] (B[n ldb + k]).
// Whole block (all kThreads threads); no synchronisation inside (callers sync around it).
template <typename T, int M, int N, int K, bool A_T, bool B_T, bool ACC>
__device__ __forceinline__ void block_gemm(const T* A, int lda, const T* B, int ldb, float* C, int ldc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) == 2) {
    namespace wmma = nvcuda::wmma;
    using LA = std::conditional_t<A_T, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<B_T, wmma::col_major, wmma::row_major>;
    constexpr int TM = M / 16, TN = N / 16;
    const int warp = threadIdx.x / 32;
    for (int t = warp; t < TM * TN; t += kWarps) {
      const int mi = t / TN, ni = t % TN;
      float* cp = C + mi * 16 * ldc + ni * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if constexpr (ACC) {
        wmma::load_matrix_sync(acc, cp, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
#pragma unroll 2
      for (int kk = 0; kk < K; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> bf;
        const T* ap = A_T ? A + kk * lda + mi * 16 : A + mi * 16 * lda + kk;
        const T* bp = B_T ? B + ni * 16 * ldb + kk : B + kk * ldb + ni * 16;
        wmma::load_matrix_sync(a, ap, lda);
        wmma::load_matrix_sync(bf, bp, ldb);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(cp, acc, ldc, wmma::mem_row_major);
    }
  } else
#endif
  {
  for (int e = threadIdx.x; e < M * N; e += kThreads) {
    const int m = e / N, n = e % N;
    float acc = ACC ? C[m * ldc + n] : 0.f;
#pragma unroll 8
    for (int kk = 0; kk < K; ++kk) {
      const float a = to_f(A_T ? A[kk * lda + m] : A[m * lda + kk]);
      const float bv = to_f(B_T ? B[n * ldb + kk] : B[kk * ldb + n]);
      acc = fmaf(a, bv, acc);
    }
    C[m * ldc + n] = acc;
  }
  }
}

// delta[r] = <dout_r, out_r> (fp32; 0 for padding / outside rows) and lse of the tile's rows.
template <typename T>
__device__ void rows_delta_lse(const Params& p, const RowInfo* rows, int nrows, int64_t b, int h, int m0,
                               float* delta, float* lse_s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* __restrict__ dout = static_cast<const T*>(p.dout);
  const T* __restrict__ out = static_cast<const T*>(p.out);
  for (int r = warp; r < nrows; r += kWarps) {
    const RowInfo& ri = rows[r];
    float acc = 0.f;
    if (ri.real) {
      for (int d = lane; d < p.D; d += 32) acc += to_f(dout[offset(p.dos, ri, h, d)]) * to_f(out[offset(p.os, ri, h, d)]);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      delta[r] = acc;
      lse_s[r] = ri.valid ? p.lse[(b * p.H + h) * int64_t(p.N) + m0 + r] : 0.f;
    }
  }
}

// Final gradient rows from G (fp32 [nrows][ldg], the gradient w.r.t. the dotted x^ before the
// factor c): g = c G; V2 chains through x^ = x / max(|x|, eps) (x re-read from memory / pad row,
// as the fp32 x^ of the Triton kernels). Stores real rows to dst; keep: also writes the result
// back into G (for the padding sums).
template <typename T>
__device__ void finalize_rows(const Params& p, float* G, int ldg, int nrows, const RowInfo* rows, int h, float c,
                              const T* __restrict__ src, const Str& ss, const T* __restrict__ pad_row, const float* inv,
                              const float* nrm, T* __restrict__ dst, const Str& dsr, bool keep) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < nrows; r += kWarps) {
    const RowInfo& ri = rows[r];
    if (!ri.valid) continue;  // warp-uniform
    if (p.cosine) {
      const float iv = inv[r];
      float proj = 0.f;
      for (int d = lane; d < p.D; d += 32) {
        const float x = ri.real ? to_f(src[offset(ss, ri, h, d)]) : (pad_row != nullptr ? to_f(pad_row[d]) : 0.f);
        proj += c * G[r * ldg + d] * (x * iv);
      }
      proj = warp_sum(proj);
      const bool big = nrm[r] > 1e-12f;
      for (int d = lane; d < p.D; d += 32) {
        const float x = ri.real ? to_f(src[offset(ss, ri, h, d)]) : (pad_row != nullptr ? to_f(pad_row[d]) : 0.f);
        const float g = c * G[r * ldg + d];
        const float res = (big ? g - (x * iv) * proj : g) * iv;
        if (keep) G[r * ldg + d] = res;
        if (ri.real) dst[offset(dsr, ri, h, d)] = from_f<T>(res);
      }
    } else {
      for (int d = lane; d < p.D; d += 32) {
        const float res = c * G[r * ldg + d];
        if (keep) G[r * ldg + d] = res;
        if (ri.real) dst[offset(dsr, ri, h, d)] = from_f<T>(res);
      }
    }
  }
}

// ---- forward ---------------------------------------------------------------------------------

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) wa_fwd_kernel(const Params p) {
  using C = Cfg<T, DP>;
  using L = FwdLayout<T, DP>;
  constexpr int BM = C::BM, BN = C::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::q);
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  float* S = reinterpret_cast<float*>(smem + L::s);
  T* P = reinterpret_cast<T*>(smem + L::p);
  float* O = reinterpret_cast<float*>(smem + L::o);
  float* m_s = reinterpret_cast<float*>(smem + L::m);
  float* l_s = reinterpret_cast<float*>(smem + L::l);
  RowInfo* qrows = reinterpret_cast<RowInfo*>(smem + L::qrows);
  RowInfo* krows = reinterpret_cast<RowInfo*>(smem + L::krows);

  const int64_t bh = blockIdx.x;  // window-heads on x: its limit is 2^31 - 1
  const int64_t b = bh / p.H;
  const int h = int(bh % p.H);
  const int m0 = blockIdx.y * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float c = p.scale[h];
  const T* pad = static_cast<const T*>(p.pad);
  const int64_t HD = int64_t(p.H) * p.D;

  fill_rows(p, b, m0, BM, qrows);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    // finite start: a row whose first key tile is all -inf then gets alpha = 0, not NaN
    m_s[r] = -1.0e30f;
    l_s[r] = 0.f;
  }
  for (int e = threadIdx.x; e < BM * DP; e += kThreads) O[(e / DP) * C::LDO + e % DP] = 0.f;
  __syncthreads();
  load_tile<T, DP>(Qs, C::LDT, static_cast<const T*>(p.q), p.qs, qrows, BM, h, p.D,
                   pad != nullptr ? pad + int64_t(h) * p.D : nullptr);
  __syncthreads();
  if (p.cosine) {
    normalize_rows<T, DP>(Qs, C::LDT, BM, nullptr, nullptr);
    __syncthreads();
  }

  for (int n0 = 0; n0 < p.N; n0 += BN) {
    fill_rows(p, b, n0, BN, krows);
    __syncthreads();
    load_tile<T, DP>(Ks, C::LDT, static_cast<const T*>(p.k), p.ks, krows, BN, h, p.D,
                     pad != nullptr ? pad + HD + int64_t(h) * p.D : nullptr);
    load_tile<T, DP>(Vs, C::LDT, static_cast<const T*>(p.v), p.vs, krows, BN, h, p.D,
                     pad != nullptr ? pad + 2 * HD + int64_t(h) * p.D : nullptr);
    __syncthreads();
    if (p.cosine) {
      normalize_rows<T, DP>(Ks, C::LDT, BN, nullptr, nullptr);
      __syncthreads();
    }
    block_gemm<T, BM, BN, DP, false, true, false>(Qs, C::LDT, Ks, C::LDT, S, C::LDS);  // S = Q K^T
    __syncthreads();
    for (int r = warp; r < BM; r += kWarps) {
      const RowInfo qi = qrows[r];
      if (!qi.valid) {  // warp-uniform; the row is never stored
        for (int j = lane; j < BN; j += 32) P[r * C::LDP + j] = from_f<T>(0.f);
        continue;
      }
      float sv[BN / 32];
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < BN / 32; ++u) {
        const int j = lane + 32 * u;
        int idx;
        sv[u] = score(p, S[r * C::LDS + j], c, h, b, qi, krows[j], m0 + r, n0 + j, idx);
        mx = fmaxf(mx, sv[u]);
      }
      mx = warp_max(mx);
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      const float alpha = expf(m_old - m_new);
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < BN / 32; ++u) {
        const float pv = expf(sv[u] - m_new);
        sum += pv;
        P[r * C::LDP + lane + 32 * u] = from_f<T>(pv);
      }
      sum = warp_sum(sum);
      for (int d = lane; d < DP; d += 32) O[r * C::LDO + d] *= alpha;
      __syncwarp();
      if (lane == 0) {
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + sum;
      }
    }
    __syncthreads();
    block_gemm<T, BM, DP, BN, false, false, true>(P, C::LDP, Vs, C::LDT, O, C::LDO);  // O += P V
    __syncthreads();
  }

  T* out = static_cast<T*>(p.out);
  for (int e = threadIdx.x; e < BM * DP; e += kThreads) {
    const int r = e / DP, d = e % DP;
    const RowInfo& qi = qrows[r];
    if (qi.real && d < p.D) out[offset(p.os, qi, h, d)] = from_f<T>(O[r * C::LDO + d] / l_s[r]);
  }
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    if (qrows[r].valid) p.lse[bh * p.N + m0 + r] = m_s[r] + logf(l_s[r]);
  }
}

// ---- backward: dk, dv (+ dq when fused), table / dc / pad partials ------------------------------

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) wa_bwd_kv_kernel(const Params p) {
  using C = Cfg<T, DP>;
  using L = KvLayout<T, DP>;
  constexpr int BM = C::BM, BN = C::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::q);
  T* dOs = reinterpret_cast<T*>(smem + L::dout);
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  float* S = reinterpret_cast<float*>(smem + L::s);
  float* X = reinterpret_cast<float*>(smem + L::x);
  T* P = reinterpret_cast<T*>(smem + L::p);
  T* dS = reinterpret_cast<T*>(smem + L::ds);
  float* dK = reinterpret_cast<float*>(smem + L::dk);
  float* dV = reinterpret_cast<float*>(smem + L::dv);
  float* lse_s = reinterpret_cast<float*>(smem + L::lse);
  float* delta_s = reinterpret_cast<float*>(smem + L::delta);
  float* qinv = reinterpret_cast<float*>(smem + L::qinv);
  float* qnrm = reinterpret_cast<float*>(smem + L::qnrm);
  float* kinv = reinterpret_cast<float*>(smem + L::kinv);
  float* knrm = reinterpret_cast<float*>(smem + L::knrm);
  float* red = reinterpret_cast<float*>(smem + L::red);
  RowInfo* qrows = reinterpret_cast<RowInfo*>(smem + L::qrows);
  RowInfo* krows = reinterpret_cast<RowInfo*>(smem + L::krows);

  const int64_t b = p.b_start + int64_t(blockIdx.x) / p.H;
  const int h = int(blockIdx.x % p.H);
  const int n0 = blockIdx.y * BN;
  const int64_t prog = (b * p.H + h) * int64_t(gridDim.y) + blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float c = p.scale[h];
  const T* pad = static_cast<const T*>(p.pad);
  const int64_t HD = int64_t(p.H) * p.D;
  const T* padq = pad != nullptr ? pad + int64_t(h) * p.D : nullptr;
  const T* padk = pad != nullptr ? pad + HD + int64_t(h) * p.D : nullptr;
  const T* padv = pad != nullptr ? pad + 2 * HD + int64_t(h) * p.D : nullptr;
  float* dtab_row = nullptr;
  if (p.dtab_mode == 1) dtab_row = p.dtab + ((b % p.dtab_rows) * p.H + h) * int64_t(p.T);
  if (p.dtab_mode == 2) dtab_row = p.dtab + ((b - p.b_start) * p.H + h) * int64_t(p.N) * p.N;

  fill_rows(p, b, n0, BN, krows);
  for (int e = threadIdx.x; e < BN * DP; e += kThreads) {
    dK[(e / DP) * C::LDO + e % DP] = 0.f;
    dV[(e / DP) * C::LDO + e % DP] = 0.f;
  }
  __syncthreads();
  load_tile<T, DP>(Ks, C::LDT, static_cast<const T*>(p.k), p.ks, krows, BN, h, p.D, padk);
  load_tile<T, DP>(Vs, C::LDT, static_cast<const T*>(p.v), p.vs, krows, BN, h, p.D, padv);
  __syncthreads();
  if (p.cosine) {
    normalize_rows<T, DP>(Ks, C::LDT, BN, kinv, knrm);
    __syncthreads();
  }

  float dls_acc = 0.f;
  for (int m0 = 0; m0 < p.N; m0 += BM) {
    fill_rows(p, b, m0, BM, qrows);
    __syncthreads();
    load_tile<T, DP>(Qs, C::LDT, static_cast<const T*>(p.q), p.qs, qrows, BM, h, p.D, padq);
    // padding queries' outputs are dropped: their dout reads as 0
    load_tile<T, DP>(dOs, C::LDT, static_cast<const T*>(p.dout), p.dos, qrows, BM, h, p.D, nullptr);
    rows_delta_lse<T>(p, qrows, BM, b, h, m0, delta_s, lse_s);
    __syncthreads();
    if (p.cosine) {
      normalize_rows<T, DP>(Qs, C::LDT, BM, qinv, qnrm);
      __syncthreads();
    }
    block_gemm<T, BM, BN, DP, false, true, false>(Qs, C::LDT, Ks, C::LDT, S, C::LDS);   // S = Q K^T
    block_gemm<T, BM, BN, DP, false, true, false>(dOs, C::LDT, Vs, C::LDT, X, C::LDX);  // dP = dO V^T
    __syncthreads();
    for (int r = warp; r < BM; r += kWarps) {
      const RowInfo qi = qrows[r];
      const float lse_r = lse_s[r], delta_r = delta_s[r];
      for (int j = lane; j < BN; j += 32) {
        const RowInfo& kj = krows[j];
        float pv = 0.f, ds = 0.f;
        if (qi.valid && kj.valid) {
          const float dot = S[r * C::LDS + j];
          int idx;
          const float s = score(p, dot, c, h, b, qi, kj, m0 + r, n0 + j, idx);
          pv = expf(s - lse_r);
          ds = pv * (X[r * C::LDX + j] - delta_r);
          if (p.cosine) dls_acc += ds * dot;
          if (p.dtab_mode == 1) atomicAdd(dtab_row + idx, ds);
          if (p.dtab_mode == 2) dtab_row[int64_t(m0 + r) * p.N + n0 + j] = ds;
        }
        P[r * C::LDP + j] = from_f<T>(pv);
        dS[r * C::LDP + j] = from_f<T>(ds);
      }
    }
    __syncthreads();
    block_gemm<T, BN, DP, BM, true, false, true>(P, C::LDP, dOs, C::LDT, dV, C::LDO);  // dV += P^T dO
    block_gemm<T, BN, DP, BM, true, false, true>(dS, C::LDP, Qs, C::LDT, dK, C::LDO);  // dK += dS^T Q^
    if (p.fuse_dq) {
      block_gemm<T, BM, DP, BN, false, false, false>(dS, C::LDP, Ks, C::LDT, X, C::LDX);  // dQ^ = dS K^
    }
    __syncthreads();
    if (p.fuse_dq) {
      finalize_rows<T>(p, X, C::LDX, BM, qrows, h, c, static_cast<const T*>(p.q), p.qs, padq, qinv, qnrm,
                       static_cast<T*>(p.dq), p.dqs, false);
      __syncthreads();
    }
  }

  finalize_rows<T>(p, dK, C::LDO, BN, krows, h, c, static_cast<const T*>(p.k), p.ks, padk, kinv, knrm,
                   static_cast<T*>(p.dk), p.dks, true);
  T* dv = static_cast<T*>(p.dv);
  for (int e = threadIdx.x; e < BN * DP; e += kThreads) {
    const int r = e / DP, d = e % DP;
    const RowInfo& kj = krows[r];
    if (kj.real && d < p.D) dv[offset(p.dvs, kj, h, d)] = from_f<T>(dV[r * C::LDO + d]);
  }
  __syncthreads();
  if (p.dpad_part != nullptr) {
    for (int d = threadIdx.x; d < p.D; d += kThreads) {
      float sk = 0.f, sv = 0.f;
      for (int j = 0; j < BN; ++j) {
        if (krows[j].valid && !krows[j].real) {
          sk += dK[j * C::LDO + d];
          sv += dV[j * C::LDO + d];
        }
      }
      p.dpad_part[prog * 2 * p.D + d] = sk;
      p.dpad_part[prog * 2 * p.D + p.D + d] = sv;
    }
  }
  if (p.cosine) {  // fixed-order block reduction of dc: deterministic
    const float w = warp_sum(dls_acc);
    if (lane == 0) red[warp] = w;
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.f;
      for (int i = 0; i < kWarps; ++i) t += red[i];
      p.dls_part[prog] = t;
    }
  }
}

// ---- backward: dq (only when N > BN) -------------------------------------------------------------

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) wa_bwd_q_kernel(const Params p) {
  using C = Cfg<T, DP>;
  using L = QLayout<T, DP>;
  constexpr int BM = C::BM, BN = C::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::q);
  T* dOs = reinterpret_cast<T*>(smem + L::dout);
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  float* S = reinterpret_cast<float*>(smem + L::s);
  float* dP = reinterpret_cast<float*>(smem + L::dp);
  T* dS = reinterpret_cast<T*>(smem + L::ds);
  float* dQ = reinterpret_cast<float*>(smem + L::dq);
  float* lse_s = reinterpret_cast<float*>(smem + L::lse);
  float* delta_s = reinterpret_cast<float*>(smem + L::delta);
  float* qinv = reinterpret_cast<float*>(smem + L::qinv);
  float* qnrm = reinterpret_cast<float*>(smem + L::qnrm);
  RowInfo* qrows = reinterpret_cast<RowInfo*>(smem + L::qrows);
  RowInfo* krows = reinterpret_cast<RowInfo*>(smem + L::krows);

  const int64_t b = int64_t(blockIdx.x) / p.H;
  const int h = int(blockIdx.x % p.H);
  const int m0 = blockIdx.y * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float c = p.scale[h];
  const T* pad = static_cast<const T*>(p.pad);
  const int64_t HD = int64_t(p.H) * p.D;
  const T* padq = pad != nullptr ? pad + int64_t(h) * p.D : nullptr;
  const T* padk = pad != nullptr ? pad + HD + int64_t(h) * p.D : nullptr;
  const T* padv = pad != nullptr ? pad + 2 * HD + int64_t(h) * p.D : nullptr;

  fill_rows(p, b, m0, BM, qrows);
  for (int e = threadIdx.x; e < BM * DP; e += kThreads) dQ[(e / DP) * C::LDO + e % DP] = 0.f;
  __syncthreads();
  load_tile<T, DP>(Qs, C::LDT, static_cast<const T*>(p.q), p.qs, qrows, BM, h, p.D, padq);
  load_tile<T, DP>(dOs, C::LDT, static_cast<const T*>(p.dout), p.dos, qrows, BM, h, p.D, nullptr);
  rows_delta_lse<T>(p, qrows, BM, b, h, m0, delta_s, lse_s);
  __syncthreads();
  if (p.cosine) {
    normalize_rows<T, DP>(Qs, C::LDT, BM, qinv, qnrm);
    __syncthreads();
  }
  for (int n0 = 0; n0 < p.N; n0 += BN) {
    fill_rows(p, b, n0, BN, krows);
    __syncthreads();
    load_tile<T, DP>(Ks, C::LDT, static_cast<const T*>(p.k), p.ks, krows, BN, h, p.D, padk);
    load_tile<T, DP>(Vs, C::LDT, static_cast<const T*>(p.v), p.vs, krows, BN, h, p.D, padv);
    __syncthreads();
    if (p.cosine) {
      normalize_rows<T, DP>(Ks, C::LDT, BN, nullptr, nullptr);
      __syncthreads();
    }
    block_gemm<T, BM, BN, DP, false, true, false>(Qs, C::LDT, Ks, C::LDT, S, C::LDS);    // S = Q K^T
    block_gemm<T, BM, BN, DP, false, true, false>(dOs, C::LDT, Vs, C::LDT, dP, C::LDS);  // dP = dO V^T
    __syncthreads();
    for (int r = warp; r < BM; r += kWarps) {
      const RowInfo qi = qrows[r];
      const float lse_r = lse_s[r], delta_r = delta_s[r];
      for (int j = lane; j < BN; j += 32) {
        const RowInfo& kj = krows[j];
        float ds = 0.f;
        if (qi.valid && kj.valid) {
          int idx;
          const float s = score(p, S[r * C::LDS + j], c, h, b, qi, kj, m0 + r, n0 + j, idx);
          const float pv = expf(s - lse_r);
          ds = pv * (dP[r * C::LDS + j] - delta_r);
        }
        dS[r * C::LDP + j] = from_f<T>(ds);
      }
    }
    __syncthreads();
    block_gemm<T, BM, DP, BN, false, false, true>(dS, C::LDP, Ks, C::LDT, dQ, C::LDO);  // dQ^ += dS K^
    __syncthreads();
  }
  finalize_rows<T>(p, dQ, C::LDO, BM, qrows, h, c, static_cast<const T*>(p.q), p.qs, padq, qinv, qnrm,
                   static_cast<T*>(p.dq), p.dqs, false);
}

// dtab[h, t] = sum of dbias[h, i, j] over idx(i, j) = t, in a fixed order (deterministic mode).
__global__ void dtab_gather_kernel(const float* __restrict__ dbias, float* __restrict__ dtab, int H, int MH, int MW) {
  const int T = (2 * MH - 1) * (2 * MW - 1);
  const int N = MH * MW;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= H * T) return;
  const int h = e / T, t = e % T;
  const int dh = t / (2 * MW - 1) - (MH - 1);
  const int dw = t % (2 * MW - 1) - (MW - 1);
  float acc = 0.f;
  for (int ih = max(0, dh); ih < min(MH, MH + dh); ++ih) {
    for (int iw = max(0, dw); iw < min(MW, MW + dw); ++iw) {
      const int i = ih * MW + iw;
      const int j = (ih - dh) * MW + (iw - dw);
      acc += dbias[int64_t(h) * N * N + int64_t(i) * N + j];
    }
  }
  dtab[e] = acc;
}

// ---- launchers -----------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Kernel>
void prepare_smem(Kernel kernel, size_t bytes) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(bytes <= props->sharedMemPerBlockOptin, "fastswin window attention (CUDA): the kernel needs ", bytes,
              " bytes of shared memory per block, this GPU allows ", props->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <typename F>
void dispatch_dp(int64_t d, F&& f) {
  switch (padded_dim(d)) {
    case 32:
      f(std::integral_constant<int, 32>{});
      break;
    case 64:
      f(std::integral_constant<int, 64>{});
      break;
    default:
      f(std::integral_constant<int, 128>{});
      break;
  }
}

#define FASTSWIN_WA_DISPATCH(TYPE, NAME, ...)                       \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

void launch_fwd(const Params& p, at::ScalarType dtype, int64_t bw, cudaStream_t stream) {
  FASTSWIN_WA_DISPATCH(dtype, "window_attention_cuda_fwd", [&] {
    using T = typename Native<scalar_t>::type;
    dispatch_dp(p.D, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      using C = Cfg<T, DP>;
      constexpr size_t bytes = FwdLayout<T, DP>::bytes;
      auto kernel = wa_fwd_kernel<T, DP>;
      prepare_smem(kernel, bytes);
      const dim3 grid(unsigned(bw * p.H), unsigned(ceil_div(p.N, C::BM)));
      kernel<<<grid, kThreads, bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_bwd_kv(const Params& p, at::ScalarType dtype, int64_t count, cudaStream_t stream) {
  FASTSWIN_WA_DISPATCH(dtype, "window_attention_cuda_bwd", [&] {
    using T = typename Native<scalar_t>::type;
    dispatch_dp(p.D, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      using C = Cfg<T, DP>;
      constexpr size_t bytes = KvLayout<T, DP>::bytes;
      auto kernel = wa_bwd_kv_kernel<T, DP>;
      prepare_smem(kernel, bytes);
      const dim3 grid(unsigned(count * p.H), unsigned(ceil_div(p.N, C::BN)));
      kernel<<<grid, kThreads, bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_bwd_q(const Params& p, at::ScalarType dtype, int64_t bw, cudaStream_t stream) {
  FASTSWIN_WA_DISPATCH(dtype, "window_attention_cuda_bwd", [&] {
    using T = typename Native<scalar_t>::type;
    dispatch_dp(p.D, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      using C = Cfg<T, DP>;
      constexpr size_t bytes = QLayout<T, DP>::bytes;
      auto kernel = wa_bwd_q_kernel<T, DP>;
      prepare_smem(kernel, bytes);
      const dim3 grid(unsigned(bw * p.H), unsigned(ceil_div(p.N, C::BM)));
      kernel<<<grid, kThreads, bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---- host side: checks, geometry, buffers ---------------------------------------------------------

Str win_strides(const at::Tensor& t) { return {t.stride(0), t.stride(2), 0, t.stride(1), t.stride(3)}; }
Str img_strides(const at::Tensor& t, int64_t d) { return {t.stride(0), t.stride(1), t.stride(2), d * t.stride(3), t.stride(3)}; }
Str qkv_strides(const at::Tensor& qkv) { return {qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(4), qkv.stride(5)}; }

void check_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fastswin window attention (CUDA): ", name,
              ": expected float16, bfloat16 or float32, got ", dt);
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastswin window attention (CUDA): ", name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "fastswin window attention (CUDA): ", name, ": expected device ", ref.device(),
              ", got ", t.device());
}

// Table / scale / mask / pad in the forms the kernels read; kept alive by the caller until the
// launches are queued (the caching allocator orders reuse on the stream).
struct Aux {
  at::Tensor table, scale, mask, pad;
};

Aux prepare_aux(Params& p, const at::Tensor& ref, const at::Tensor& table, const at::Tensor& scale,
                const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& pad, bool use_pad) {
  Aux a;
  check_cuda(table, ref, "rel_pos_table");
  check_cuda(scale, ref, "scale");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == p.T && table.size(1) == p.H,
              "fastswin window attention (CUDA): rel_pos_table: expected shape (", p.T, ", ", p.H, "), got ", table.sizes());
  TORCH_CHECK(scale.numel() == p.H, "fastswin window attention (CUDA): scale: expected ", p.H, " elements, got ",
              scale.numel());
  a.table = table.t().to(at::kFloat).contiguous();  // (H, T)
  a.scale = scale.reshape({-1}).to(at::kFloat).contiguous();
  p.table = a.table.data_ptr<float>();
  p.scale = a.scale.data_ptr<float>();
  if (mask.has_value() && mask->defined()) {
    check_cuda(*mask, ref, "mask");
    a.mask = mask->to(at::kFloat).contiguous();
    p.mask = a.mask.data_ptr<float>();
    p.has_mask = 1;
  }
  if (use_pad && pad.has_value() && pad->defined()) {
    check_cuda(*pad, ref, "pad_qkv");
    TORCH_CHECK(pad->dim() == 3 && pad->size(0) == 3 && pad->size(1) == p.H && pad->size(2) == p.D,
                "fastswin window attention (CUDA): pad_qkv: expected shape (3, ", p.H, ", ", p.D, "), got ", pad->sizes());
    a.pad = pad->to(ref.scalar_type()).contiguous();
    p.pad = a.pad.data_ptr();
  }
  return a;
}

void init_window(Params& p, int64_t heads, int64_t d, int64_t wh, int64_t ww) {
  TORCH_CHECK(wh >= 1 && ww >= 1, "fastswin window attention (CUDA): window size must be >= 1, got (", wh, ", ", ww, ")");
  TORCH_CHECK(d >= 1 && d <= 128, "fastswin window attention (CUDA): head_dim must be in [1, 128], got ", d);
  TORCH_CHECK(wh * ww <= (1 << 20), "fastswin window attention (CUDA): window too large");
  p.N = int(wh * ww);
  p.MH = int(wh);
  p.MW = int(ww);
  p.H = int(heads);
  p.D = int(d);
  p.T = int((2 * wh - 1) * (2 * ww - 1));
  p.n_win = 1;
  p.n_win_w = 1;
  p.img_h = 1;
  p.img_w = 1;
}

void check_grid(int64_t bw, int64_t heads) {
  TORCH_CHECK(bw * heads <= int64_t(std::numeric_limits<int32_t>::max()),
              "fastswin window attention (CUDA): windows x heads = ", bw * heads, " exceeds the grid limit");
}

// Windowed-entry geometry and q/k/v pointers.
int64_t setup_windowed(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t wh, int64_t ww,
                       const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4, "fastswin window attention (CUDA): q: expected (B*nW, heads, N, head_dim), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "fastswin window attention (CUDA): k and v must have the shape of q ", q.sizes());
  check_dtype(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastswin window attention (CUDA): q, k and v must share one dtype");
  check_cuda(q, q, "q");
  check_cuda(k, q, "k");
  check_cuda(v, q, "v");
  init_window(p, q.size(1), q.size(3), wh, ww);
  TORCH_CHECK(q.size(2) == p.N, "fastswin window attention (CUDA): window (", wh, ", ", ww, ") has ", p.N,
              " tokens, q has N = ", q.size(2));
  const int64_t bw = q.size(0);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 3 && mask->size(0) >= 1 && mask->size(1) == p.N && mask->size(2) == p.N &&
                    bw % mask->size(0) == 0,
                "fastswin window attention (CUDA): mask: expected (nW, N, N) with nW dividing ", bw, ", got ", mask->sizes());
    p.n_win = int(mask->size(0));
  }
  check_grid(bw, p.H);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.qs = win_strides(q);
  p.ks = win_strides(k);
  p.vs = win_strides(v);
  return bw;
}

// Block-entry geometry (padded grid, shift) and q/k/v pointers into qkv. Returns B * nW.
int64_t setup_block(Params& p, const at::Tensor& qkv, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  TORCH_CHECK(qkv.dim() == 6 && qkv.size(3) == 3 && qkv.size(1) >= 1 && qkv.size(2) >= 1,
              "fastswin window attention (CUDA): qkv: expected (B, H, W, 3, heads, head_dim), got ", qkv.sizes());
  check_dtype(qkv, "qkv");
  check_cuda(qkv, qkv, "qkv");
  init_window(p, qkv.size(4), qkv.size(5), wh, ww);
  TORCH_CHECK(sh >= 0 && sh < wh && sw >= 0 && sw < ww, "fastswin window attention (CUDA): shift (", sh, ", ", sw,
              ") must satisfy 0 <= shift < window (", wh, ", ", ww, ")");
  const int64_t hi = qkv.size(1), wi = qkv.size(2);
  const int64_t hp = ceil_div(hi, wh) * wh, wp = ceil_div(wi, ww) * ww;
  p.block_mode = 1;
  p.img_h = int(hi);
  p.img_w = int(wi);
  p.hp = int(hp);
  p.wp = int(wp);
  p.shift_h = int(sh);
  p.shift_w = int(sw);
  p.has_shift = (sh > 0 || sw > 0) ? 1 : 0;
  p.n_win_w = int(wp / ww);
  p.n_win = int((hp / wh) * (wp / ww));
  const int64_t bw = qkv.size(0) * p.n_win;
  check_grid(bw, p.H);
  p.q = qkv.select(3, 0).data_ptr();
  p.k = qkv.select(3, 1).data_ptr();
  p.v = qkv.select(3, 2).data_ptr();
  p.qs = p.ks = p.vs = qkv_strides(qkv);
  return bw;
}

bool block_has_padding(const at::Tensor& qkv, int64_t wh, int64_t ww) {
  return qkv.size(1) % wh != 0 || qkv.size(2) % ww != 0;
}

// The backward's launches; returns (dtable (H, T) fp32 or undefined, dpad_part, dls_part).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_bwd(Params& p, at::ScalarType dtype, int64_t bw, bool need_dtable,
                                                       bool need_dpad, bool deterministic, const at::TensorOptions& fopt,
                                                       cudaStream_t stream) {
  const int bn = tile_rows(dtype == at::kFloat ? 4 : 2, padded_dim(p.D));
  const int64_t nblk = ceil_div(p.N, bn);
  p.fuse_dq = nblk == 1 ? 1 : 0;
  at::Tensor dls_part, dpad_part, dtab;
  if (p.cosine) {
    dls_part = at::empty({bw, p.H, nblk}, fopt);
    p.dls_part = dls_part.data_ptr<float>();
  }
  if (need_dpad && p.pad != nullptr) {
    dpad_part = at::empty({bw, p.H, nblk, 2, p.D}, fopt);
    p.dpad_part = dpad_part.data_ptr<float>();
  }
  if (!need_dtable) {
    p.dtab_mode = 0;
    p.b_start = 0;
    launch_bwd_kv(p, dtype, bw, stream);
  } else if (!deterministic) {
    const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(bw, kScratchElems / (int64_t(p.H) * p.T)));
    at::Tensor part = at::zeros({rows, p.H, p.T}, fopt);
    p.dtab = part.data_ptr<float>();
    p.dtab_mode = 1;
    p.dtab_rows = int(rows);
    p.b_start = 0;
    launch_bwd_kv(p, dtype, bw, stream);
    dtab = part.sum(0);  // (H, T)
  } else {
    const int64_t nn = int64_t(p.N) * p.N;
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(bw, kScratchElems / (int64_t(p.H) * nn)));
    at::Tensor ds_buf = at::empty({chunk, p.H, p.N, p.N}, fopt);
    at::Tensor dbias = at::zeros({p.H, nn}, fopt);
    p.dtab = ds_buf.data_ptr<float>();
    p.dtab_mode = 2;
    p.dtab_rows = 1;
    for (int64_t b0 = 0; b0 < bw; b0 += chunk) {
      const int64_t cnt = std::min(chunk, bw - b0);
      p.b_start = b0;
      launch_bwd_kv(p, dtype, cnt, stream);
      dbias += ds_buf.narrow(0, 0, cnt).sum(0).view({p.H, nn});  // fixed order: chunk by chunk
    }
    p.b_start = 0;
    dtab = at::empty({p.H, p.T}, fopt);
    const int64_t total = int64_t(p.H) * p.T;
    if (total > 0) {
      dtab_gather_kernel<<<unsigned(ceil_div(total, 256)), 256, 0, stream>>>(dbias.data_ptr<float>(), dtab.data_ptr<float>(),
                                                                           p.H, p.MH, p.MW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (!p.fuse_dq) launch_bwd_q(p, dtype, bw, stream);
  return {dtab, dpad_part, dls_part};
}

// ---- the ops ----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> window_attention_cuda_fwd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& rel_pos_table,
                                                             int64_t window_h, int64_t window_w,
                                                             const std::optional<at::Tensor>& mask,
                                                             const at::Tensor& scale, bool cosine) {
  c10::cuda::CUDAGuard guard(q.device());
  Params p{};
  const int64_t bw = setup_windowed(p, q, k, v, window_h, window_w, mask);
  p.cosine = cosine ? 1 : 0;
  Aux aux = prepare_aux(p, q, rel_pos_table, scale, mask, std::nullopt, false);
  at::Tensor out = at::empty({bw, p.H, p.N, p.D}, q.options());
  at::Tensor lse = at::empty({bw, p.H, p.N}, q.options().dtype(at::kFloat));
  if (bw == 0 || p.H == 0) return {out, lse};
  p.out = out.data_ptr();
  p.os = win_strides(out);
  p.lse = lse.data_ptr<float>();
  launch_fwd(p, q.scalar_type(), bw, at::cuda::getCurrentCUDAStream());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_cuda_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& rel_pos_table, const at::Tensor& out, const at::Tensor& lse, int64_t window_h, int64_t window_w,
    const std::optional<at::Tensor>& mask, const at::Tensor& scale, bool cosine, bool need_dtable, bool deterministic) {
  c10::cuda::CUDAGuard guard(q.device());
  Params p{};
  const int64_t bw = setup_windowed(p, q, k, v, window_h, window_w, mask);
  p.cosine = cosine ? 1 : 0;
  Aux aux = prepare_aux(p, q, rel_pos_table, scale, mask, std::nullopt, false);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "fastswin window attention (CUDA): dout and out must have the shape of q");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fastswin window attention (CUDA): dout and out must have q's dtype");
  check_cuda(dout, q, "dout");
  check_cuda(out, q, "out");
  check_cuda(lse, q, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == bw * p.H * p.N,
              "fastswin window attention (CUDA): lse: expected float32 (B*nW, heads, N)");
  at::Tensor lse_c = lse.contiguous();
  const auto fopt = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  at::Tensor dtab_out = need_dtable ? at::zeros_like(rel_pos_table) : at::empty({0}, rel_pos_table.options());
  at::Tensor dscale = cosine ? at::zeros_like(scale) : at::empty({0}, scale.options());
  if (bw == 0 || p.H == 0) return {dq, dk, dv, dtab_out, dscale};
  p.out = const_cast<void*>(out.data_ptr());
  p.os = win_strides(out);
  p.lse = lse_c.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dos = win_strides(dout);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dqs = win_strides(dq);
  p.dks = win_strides(dk);
  p.dvs = win_strides(dv);
  auto [dtab, dpad_part, dls_part] =
      run_bwd(p, q.scalar_type(), bw, need_dtable, false, deterministic, fopt, at::cuda::getCurrentCUDAStream());
  if (need_dtable) dtab_out = dtab.t().to(rel_pos_table.scalar_type()).contiguous();
  if (cosine) dscale = dls_part.sum({0, 2}).to(scale.scalar_type()).reshape(scale.sizes());
  return {dq, dk, dv, dtab_out, dscale};
}

std::tuple<at::Tensor, at::Tensor> shifted_window_attention_cuda_fwd(const at::Tensor& qkv,
                                                                     const at::Tensor& rel_pos_table, int64_t window_h,
                                                                     int64_t window_w, int64_t shift_h, int64_t shift_w,
                                                                     const std::optional<at::Tensor>& pad_qkv,
                                                                     const at::Tensor& scale, bool cosine) {
  c10::cuda::CUDAGuard guard(qkv.device());
  Params p{};
  const int64_t bw = setup_block(p, qkv, window_h, window_w, shift_h, shift_w);
  p.cosine = cosine ? 1 : 0;
  Aux aux = prepare_aux(p, qkv, rel_pos_table, scale, std::nullopt, pad_qkv, block_has_padding(qkv, window_h, window_w));
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1), qkv.size(2), int64_t(p.H) * p.D}, qkv.options());
  at::Tensor lse = at::empty({bw, p.H, p.N}, qkv.options().dtype(at::kFloat));
  if (bw == 0 || p.H == 0) return {out, lse};
  p.out = out.data_ptr();
  p.os = img_strides(out, p.D);
  p.lse = lse.data_ptr<float>();
  launch_fwd(p, qkv.scalar_type(), bw, at::cuda::getCurrentCUDAStream());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shifted_window_attention_cuda_bwd(
    const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& rel_pos_table, const at::Tensor& out,
    const at::Tensor& lse, int64_t window_h, int64_t window_w, int64_t shift_h, int64_t shift_w,
    const std::optional<at::Tensor>& pad_qkv, const at::Tensor& scale, bool cosine, bool need_dtable, bool need_dpad,
    bool deterministic) {
  c10::cuda::CUDAGuard guard(qkv.device());
  Params p{};
  const int64_t bw = setup_block(p, qkv, window_h, window_w, shift_h, shift_w);
  p.cosine = cosine ? 1 : 0;
  const bool padding = block_has_padding(qkv, window_h, window_w);
  Aux aux = prepare_aux(p, qkv, rel_pos_table, scale, std::nullopt, pad_qkv, padding);
  const std::vector<int64_t> img = {qkv.size(0), qkv.size(1), qkv.size(2), int64_t(p.H) * p.D};
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(img) && out.sizes() == at::IntArrayRef(img),
              "fastswin window attention (CUDA): dout and out: expected (B, H, W, heads*head_dim)");
  TORCH_CHECK(dout.scalar_type() == qkv.scalar_type() && out.scalar_type() == qkv.scalar_type(),
              "fastswin window attention (CUDA): dout and out must have qkv's dtype");
  check_cuda(dout, qkv, "dout");
  check_cuda(out, qkv, "out");
  check_cuda(lse, qkv, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == bw * p.H * p.N,
              "fastswin window attention (CUDA): lse: expected float32 (B*nW, heads, N)");
  at::Tensor lse_c = lse.contiguous();
  const auto fopt = qkv.options().dtype(at::kFloat);
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  at::Tensor dtab_out = need_dtable ? at::zeros_like(rel_pos_table) : at::empty({0}, rel_pos_table.options());
  const bool has_pad_arg = pad_qkv.has_value() && pad_qkv->defined();
  at::Tensor dpad_out =
      (need_dpad && has_pad_arg) ? at::zeros_like(*pad_qkv) : at::empty({0}, qkv.options());
  at::Tensor dscale = cosine ? at::zeros_like(scale) : at::empty({0}, scale.options());
  if (bw == 0 || p.H == 0) {
    if (dqkv.numel() > 0) dqkv.zero_();
    return {dqkv, dtab_out, dpad_out, dscale};
  }
  p.out = const_cast<void*>(out.data_ptr());
  p.os = img_strides(out, p.D);
  p.lse = lse_c.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dos = img_strides(dout, p.D);
  p.dq = dqkv.select(3, 0).data_ptr();
  p.dk = dqkv.select(3, 1).data_ptr();
  p.dv = dqkv.select(3, 2).data_ptr();
  p.dqs = p.dks = p.dvs = qkv_strides(dqkv);
  auto [dtab, dpad_part, dls_part] = run_bwd(p, qkv.scalar_type(), bw, need_dtable, need_dpad && has_pad_arg,
                                             deterministic, fopt, at::cuda::getCurrentCUDAStream());
  if (need_dtable) dtab_out = dtab.t().to(rel_pos_table.scalar_type()).contiguous();
  if (dpad_part.defined()) {
    // (BW, H, nblk, 2, D) -> (2, H, D) for k, v; row 0 (q) stays 0: padded queries' outputs are dropped.
    dpad_out.narrow(0, 1, 2).copy_(dpad_part.sum({0, 2}).permute({1, 0, 2}));
  }
  if (cosine) dscale = dls_part.sum({0, 2}).to(scale.scalar_type()).reshape(scale.sizes());
  return {dqkv, dtab_out, dpad_out, dscale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastswin, CUDA, m) {
  m.impl("window_attention_cuda_fwd", &window_attention_cuda_fwd);
  m.impl("window_attention_cuda_bwd", &window_attention_cuda_bwd);
  m.impl("shifted_window_attention_cuda_fwd", &shifted_window_attention_cuda_fwd);
  m.impl("shifted_window_attention_cuda_bwd", &shifted_window_attention_cuda_bwd);
}

}  // namespace fastswin
