// Persistent LSTM forward and backward-through-time kernels (see lstm_persistent.cuh). Torch-free.
//
// Per CTA and step: the exchange buffer (B x K, K = H forward, 4H backward) streams through shared memory in tiles
// of MC rows x KC columns (cp.async.cg: L2 only, two buffers, the next tile loading while the current one is
// multiplied); the 8 warps split each tile's K range, multiply it with the resident weight slice (NW x K) and sum
// their partial products through shared memory; the cell math of the CTA's units then reads those sums.
#include "lstm/lstm_persistent.cuh"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace dlkernels {
namespace lstm {
namespace {

namespace cg = cooperative_groups;
namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------------------------------
// Storage types

template <typename T>
struct Storage;
template <>
struct Storage<float> {
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <>
struct Storage<__half> {
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Storage<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// ---------------------------------------------------------------------------------------------------------------
// Tiling shared by host (shared-memory sizes) and device. NW: rows of the resident weight slice (= columns of the
// per-step product). fp16/bf16 use wmma (m16n16k16 for NW >= 16, m32n8k16 for NW == 8) on 32-row tiles; fp32 uses
// FMA with a 4x4 register tile per lane, the 32 lanes covering MC x NW = 512 outputs.

template <typename T>
constexpr bool uses_tensor_cores() {
  return !std::is_same<T, float>::value;
}

// Rows of the backward weight slice: the HC columns of the CTA's units, padded to 8 for wmma's m32n8k16.
template <typename T, int HC>
constexpr int backward_rows() {
  return uses_tensor_cores<T>() && HC < 8 ? 8 : HC;
}

template <typename T, int NW>
struct Tiling {
  static constexpr bool kTensorCores = uses_tensor_cores<T>();
  static constexpr int kRows = kTensorCores ? 32 : 512 / NW;  // MC
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));  // row padding (16 bytes): conflict-free tiles
  static_assert(kTensorCores ? (NW % 16 == 0 || NW == 8) : (NW % 4 == 0 && kRows % 4 == 0), "tile shape");
};

constexpr std::size_t align128(std::size_t n) { return (n + 127) / 128 * 128; }

struct SmemLayout {
  std::size_t weights, tiles, partials, total;
};

template <typename T, int NW>
__host__ __device__ constexpr SmemLayout smem_layout(int k, int k_chunk) {
  using Tl = Tiling<T, NW>;
  const std::size_t weights = align128(sizeof(T) * NW * static_cast<std::size_t>(k + Tl::kPad));
  const std::size_t tiles = align128(sizeof(T) * 2 * Tl::kRows * static_cast<std::size_t>(k_chunk + Tl::kPad));
  const std::size_t partials = align128(sizeof(float) * kWarps * Tl::kRows * NW);
  return SmemLayout{weights, tiles, partials, weights + tiles + partials};
}

// ---------------------------------------------------------------------------------------------------------------
// Warp-level products: acc[m][n] += sum_k a[m][k] * w[n][k] over the warp's k range of one tile.

template <typename T, int NW>
struct WarpTensorCoreProduct {
  static constexpr int kM = NW >= 16 ? 16 : 32;
  static constexpr int kN = NW >= 16 ? 16 : 8;
  static constexpr int kMC = Tiling<T, NW>::kRows;
  static constexpr int kMT = kMC / kM;
  static constexpr int kNT = NW / kN;
  wmma::fragment<wmma::accumulator, kM, kN, 16, float> acc[kMT][kNT];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) wmma::fill_fragment(acc[mt][nt], 0.0f);
  }

  // a: the tile (row-major, lda), its columns k_begin..k_begin+k_count; w: the weight slice (NW rows of ldw),
  // columns w_offset + k. Only the m-tiles holding the first `rows` rows are computed.
  __device__ __forceinline__ void run(const T* a, int lda, const T* w, int ldw, int k_begin, int k_count,
                                      int w_offset, int rows) {
    const int m_tiles = (rows + kM - 1) / kM;
#pragma unroll 2
    for (int k = k_begin; k < k_begin + k_count; k += 16) {
      wmma::fragment<wmma::matrix_b, kM, kN, 16, T, wmma::col_major> b[kNT];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) wmma::load_matrix_sync(b[nt], w + nt * kN * ldw + w_offset + k, ldw);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if (mt < m_tiles) {
          wmma::fragment<wmma::matrix_a, kM, kN, 16, T, wmma::row_major> a_frag;
          wmma::load_matrix_sync(a_frag, a + mt * kM * lda + k, lda);
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) wmma::mma_sync(acc[mt][nt], a_frag, b[nt], acc[mt][nt]);
        }
      }
    }
  }

  // partials: this warp's MC x NW fp32 block (row-major).
  __device__ __forceinline__ void store(float* partials, int rows) {
    const int m_tiles = (rows + kM - 1) / kM;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      if (mt < m_tiles) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
          wmma::store_matrix_sync(partials + mt * kM * NW + nt * kN, acc[mt][nt], NW, wmma::mem_row_major);
      }
    }
  }
};

template <int NW>
struct WarpFmaProduct {
  static constexpr int kMC = Tiling<float, NW>::kRows;
  static constexpr int kMQ = kMC / 4;  // lanes along rows; a lane owns rows mi + r * kMQ (consecutive lanes read
  static constexpr int kNQ = NW / 4;   // consecutive rows: conflict-free 16-byte loads with the 16-byte row pad)
  static_assert(kMQ * kNQ == 32, "one 4x4 register tile per lane");
  float acc[4][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
  }

  // Only the register-tile rows r with r * kMQ < rows do any work (a chunk of a small batch: fewer FMAs).
  __device__ __forceinline__ void run(const float* a, int lda, const float* w, int ldw, int k_begin, int k_count,
                                      int w_offset, int rows) {
    if (rows > 3 * kMQ) {
      run_rows<4>(a, lda, w, ldw, k_begin, k_count, w_offset);
    } else if (rows > 2 * kMQ) {
      run_rows<3>(a, lda, w, ldw, k_begin, k_count, w_offset);
    } else if (rows > kMQ) {
      run_rows<2>(a, lda, w, ldw, k_begin, k_count, w_offset);
    } else {
      run_rows<1>(a, lda, w, ldw, k_begin, k_count, w_offset);
    }
  }

  template <int R>
  __device__ __forceinline__ void run_rows(const float* a, int lda, const float* w, int ldw, int k_begin,
                                           int k_count, int w_offset) {
    const int lane = threadIdx.x % 32;
    const int mi = lane / kNQ;
    const int ni = lane % kNQ;
#pragma unroll 2
    for (int k = k_begin; k < k_begin + k_count; k += 4) {
      float4 av[R], wv[4];
#pragma unroll
      for (int r = 0; r < R; ++r) av[r] = *reinterpret_cast<const float4*>(a + (mi + r * kMQ) * lda + k);
#pragma unroll
      for (int c = 0; c < 4; ++c)
        wv[c] = *reinterpret_cast<const float4*>(w + (ni + c * kNQ) * ldw + w_offset + k);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float s = acc[r][c];
          s = fmaf(av[r].x, wv[c].x, s);
          s = fmaf(av[r].y, wv[c].y, s);
          s = fmaf(av[r].z, wv[c].z, s);
          s = fmaf(av[r].w, wv[c].w, s);
          acc[r][c] = s;
        }
    }
  }

  __device__ __forceinline__ void store(float* partials, int /*rows*/) {
    const int lane = threadIdx.x % 32;
    const int mi = lane / kNQ;
    const int ni = lane % kNQ;
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) partials[(mi + r * kMQ) * NW + ni + c * kNQ] = acc[r][c];
  }
};

template <typename T, int NW>
using WarpProduct =
    typename std::conditional<Tiling<T, NW>::kTensorCores, WarpTensorCoreProduct<T, NW>, WarpFmaProduct<NW>>::type;

// ---------------------------------------------------------------------------------------------------------------
// Asynchronous tile loads. .cg caches in L2 only: the exchange buffer is rewritten by other SMs every step, and
// L2 is where their writes meet (the grid barrier orders them before these reads).

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// tile[r][c] = src[r][k0 + c] for r < rows, c < k_chunk (src rows of ld_src elements).
template <typename T>
__device__ __forceinline__ void load_tile(T* tile, int ld_tile, const T* src, int ld_src, int rows, int k0,
                                          int k_chunk) {
  constexpr int kPerCopy = 16 / static_cast<int>(sizeof(T));
  const int copies_per_row = k_chunk / kPerCopy;
  for (int i = threadIdx.x; i < rows * copies_per_row; i += kThreads) {
    const int r = i / copies_per_row;
    const int c = (i - r * copies_per_row) * kPerCopy;
    cp_async_16(tile + r * ld_tile + c, src + static_cast<int64_t>(r) * ld_src + k0 + c);
  }
  cp_async_commit();
}

// One step of one CTA: for each chunk of MC batch rows, `prefetch(base, rows)` (issue the cell math's global loads
// early), then, unless `multiply` is false, partials = src[base:base+rows, :] @ weights^T (K columns, in tiles of
// k_chunk), then `finish(base, rows, partials)` with partials (kWarps x MC x NW fp32, summed by the caller) or
// nullptr when not multiplying.
template <typename T, int NW, typename Prefetch, typename Finish>
__device__ __forceinline__ void step_product(const T* src, int batch, int k, int k_chunk, const T* weights,
                                             T* tiles, float* partials, bool multiply, Prefetch& prefetch,
                                             Finish& finish) {
  using Tl = Tiling<T, NW>;
  constexpr int MC = Tl::kRows;
  const int chunks = (batch + MC - 1) / MC;
  if (!multiply) {
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int base = chunk * MC;
      const int rows = min(MC, batch - base);
      prefetch(base, rows);
      finish(base, rows, static_cast<const float*>(nullptr));
    }
    return;
  }
  const int warp = threadIdx.x / 32;
  const int lda = k_chunk + Tl::kPad;
  const int ldw = k + Tl::kPad;
  const int k_tiles = k / k_chunk;
  const int n_tiles = chunks * k_tiles;
  const int warp_k = k_chunk / kWarps;
  auto issue = [&](int i) {
    const int base = (i / k_tiles) * MC;
    load_tile(tiles + (i & 1) * MC * lda, lda, src + static_cast<int64_t>(base) * k, k, min(MC, batch - base),
              (i % k_tiles) * k_chunk, k_chunk);
  };
  WarpProduct<T, NW> product;
  issue(0);
  for (int i = 0; i < n_tiles; ++i) {
    const int chunk = i / k_tiles;
    const int kt = i - chunk * k_tiles;
    const int base = chunk * MC;
    const int rows = min(MC, batch - base);
    if (kt == 0) {
      prefetch(base, rows);
      product.zero();
    }
    if (i + 1 < n_tiles) {
      issue(i + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile i is in shared memory for every warp
    product.run(tiles + (i & 1) * MC * lda, lda, weights, ldw, warp * warp_k, warp_k, kt * k_chunk, rows);
    if (kt == k_tiles - 1) {
      product.store(partials + warp * MC * NW, rows);
      __syncthreads();  // every warp's partials are written
      finish(base, rows, static_cast<const float*>(partials));
    }
    __syncthreads();  // tile buffer i & 1 and the partials are free again
  }
}

// Pulls the line holding `p` into L2: the next step's per-unit inputs (x_proj, saved gates) are read right after the
// grid barrier, where an L2 hit is about half an HBM access.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

struct ForwardParams {
  ForwardArgs a;
  int k_chunk;
};

struct BackwardParams {
  BackwardArgs a;
  int k_chunk;
};

// ---------------------------------------------------------------------------------------------------------------
// Forward: CTA j owns units j*HC .. j*HC+HC-1; its weight rows are W_hh[g*H + j*HC + u, :] (local row g*HC + u).

template <typename T, int HC>
__global__ void __launch_bounds__(kThreads, 1) lstm_forward_kernel(const __grid_constant__ ForwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int NW = 4 * HC;
  using Tl = Tiling<T, NW>;
  constexpr int MC = Tl::kRows;
  constexpr int kPerThread = (MC * HC + kThreads - 1) / kThreads;
  const ForwardArgs& a = p.a;
  const int H = a.hidden, B = a.batch, steps = a.steps;
  const int64_t H4 = 4 * static_cast<int64_t>(H);
  const int col0 = blockIdx.x * HC;

  extern __shared__ __align__(128) unsigned char smem[];
  const SmemLayout layout = smem_layout<T, NW>(H, p.k_chunk);
  T* weights = reinterpret_cast<T*>(smem);
  T* tiles = reinterpret_cast<T*>(smem + layout.weights);
  float* partials = reinterpret_cast<float*>(smem + layout.weights + layout.tiles);

  // The resident weight slice, loaded once: weights[g*HC + u][k] = W_hh[g*H + col0 + u][k].
  const T* w_hh = static_cast<const T*>(a.w_hh);
  const int ldw = H + Tl::kPad;
  for (int i = threadIdx.x; i < NW * H; i += kThreads) {
    const int n = i / H;
    const int k = i - n * H;
    const int g = n / HC;
    weights[n * ldw + k] = w_hh[(static_cast<int64_t>(g) * H + col0 + n - g * HC) * H + k];
  }
  __syncthreads();

  const T* x_proj = static_cast<const T*>(a.x_proj);
  T* exchange = static_cast<T*>(a.exchange);
  T* y = static_cast<T*>(a.y);
  T* h_n = static_cast<T*>(a.h_n);
  const T zero = Storage<T>::store(0.0f);
  cg::grid_group grid = cg::this_grid();

  for (int t = 0; t < steps; ++t) {
    const T* h_prev = t == 0 ? static_cast<const T*>(a.h0) : exchange + (t & 1) * static_cast<int64_t>(B) * H;
    T* h_next = exchange + ((t + 1) & 1) * static_cast<int64_t>(B) * H;
    const float* c_prev = t == 0 ? a.c0 : a.c_n;

    // The cell inputs of this thread's (row, unit) pairs, loaded while the tiles are multiplied.
    float xp[kPerThread][4], c_old[kPerThread];
    T h_old[kPerThread];
    int length[kPerThread];
    auto prefetch = [&](int base, int rows) {
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int idx = threadIdx.x + e * kThreads;
        if (idx < rows * HC) {
          const int b = base + idx / HC;
          const int col = col0 + idx % HC;
          const int64_t row = static_cast<int64_t>(t) * B + b;
#pragma unroll
          for (int g = 0; g < 4; ++g) xp[e][g] = Storage<T>::load(x_proj[row * H4 + g * H + col]);
          c_old[e] = c_prev[static_cast<int64_t>(b) * H + col];
          h_old[e] = __ldcg(h_prev + static_cast<int64_t>(b) * H + col);
          length[e] = a.lengths != nullptr ? __ldg(a.lengths + b) : steps;
        }
      }
    };
    auto finish = [&](int base, int rows, const float* sums) {
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int idx = threadIdx.x + e * kThreads;
        if (idx < rows * HC) {
          const int m = idx / HC;
          const int u = idx % HC;
          const int b = base + m;
          const int col = col0 + u;
          const int64_t row = static_cast<int64_t>(t) * B + b;
          const int64_t bh = static_cast<int64_t>(b) * H + col;
          const bool valid = t < length[e];
          float act[4];
#pragma unroll
          for (int g = 0; g < 4; ++g) {
            float s = xp[e][g];
#pragma unroll
            for (int w = 0; w < kWarps; ++w) s += sums[(w * MC + m) * NW + g * HC + u];
            act[g] = g == 2 ? tanhf(s) : sigmoid(s);
          }
          float c = c_old[e];
          T h = h_old[e];
          if (valid) {
            c = act[1] * c + act[0] * act[2];
            h = Storage<T>::store(act[3] * tanhf(c));
          }
          h_next[bh] = h;
          y[row * H + col] = valid ? h : zero;
          a.c_n[bh] = c;
          if (a.gates != nullptr) {
#pragma unroll
            for (int g = 0; g < 4; ++g) a.gates[row * H4 + g * H + col] = valid ? act[g] : 0.0f;
            a.c_all[row * H + col] = c;
          }
          if (t == steps - 1) h_n[bh] = h;
          if (u == 0 && t + 1 < steps) {  // one prefetch per (row, gate) segment of HC units
#pragma unroll
            for (int g = 0; g < 4; ++g) prefetch_l2(x_proj + (row + B) * H4 + g * H + col);
          }
        }
      }
    };
    step_product<T, NW>(h_prev, B, H, p.k_chunk, weights, tiles, partials, true, prefetch, finish);
    if (t + 1 < steps) grid.sync();  // h_next is complete before any CTA reads it
  }
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Backward through time: CTA j owns units j*HC .. j*HC+HC-1; its weight rows are the columns of those units,
// weights[u][r] = W_hh[r][j*HC + u] for all 4H gate rows r (rows HC..NW-1 zero where wmma needs NW = 8 > HC).
// Step s (T-1 down to 0, then -1 for grad_h0): dh arriving at h_s = (grad_gates[s+1] @ W_hh)[:, units] when step
// s+1 was valid for the row, else the carried dh (grad_h_n passed through the padded steps); grad_h0 and grad_c0
// hold the running dh and dc.

template <typename T, int HC>
__global__ void __launch_bounds__(kThreads, 1) lstm_backward_kernel(const __grid_constant__ BackwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int NW = backward_rows<T, HC>();
  using Tl = Tiling<T, NW>;
  constexpr int MC = Tl::kRows;
  constexpr int kPerThread = (MC * HC + kThreads - 1) / kThreads;
  const BackwardArgs& a = p.a;
  const int H = a.hidden, B = a.batch, steps = a.steps;
  const int K = 4 * H;
  const int col0 = blockIdx.x * HC;

  extern __shared__ __align__(128) unsigned char smem[];
  const SmemLayout layout = smem_layout<T, NW>(K, p.k_chunk);
  T* weights = reinterpret_cast<T*>(smem);
  T* tiles = reinterpret_cast<T*>(smem + layout.weights);
  float* partials = reinterpret_cast<float*>(smem + layout.weights + layout.tiles);

  const T* w_hh = static_cast<const T*>(a.w_hh);
  const int ldw = K + Tl::kPad;
  const T zero = Storage<T>::store(0.0f);
  for (int i = threadIdx.x; i < NW * K; i += kThreads) {
    const int r = i / NW;
    const int u = i - r * NW;
    weights[u * ldw + r] = u < HC ? w_hh[static_cast<int64_t>(r) * H + col0 + u] : zero;
  }
  __syncthreads();

  T* exchange = static_cast<T*>(a.exchange);
  const int64_t B4H = static_cast<int64_t>(B) * K;
  cg::grid_group grid = cg::this_grid();

  for (int s = steps - 1; s >= -1; --s) {
    const bool last = s == steps - 1;
    const T* g_later = exchange + ((s + 1) & 1) * B4H;  // grad_gates[s + 1], when s + 1 < steps
    T* g_here = exchange + (s & 1) * B4H;
    const float* dh_carried = last ? a.grad_h_n : a.grad_h0;
    const float* dc_carried = last ? a.grad_c_n : a.grad_c0;

    float act[kPerThread][4], c_cur[kPerThread], c_old[kPerThread], dy[kPerThread], dh_old[kPerThread],
        dc_old[kPerThread];
    int length[kPerThread];
    auto prefetch = [&](int base, int rows) {
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int idx = threadIdx.x + e * kThreads;
        if (idx < rows * HC) {
          const int b = base + idx / HC;
          const int col = col0 + idx % HC;
          const int64_t bh = static_cast<int64_t>(b) * H + col;
          length[e] = a.lengths != nullptr ? __ldg(a.lengths + b) : steps;
          dh_old[e] = dh_carried[bh];
          dc_old[e] = dc_carried[bh];
          if (s >= 0) {
            const int64_t row = static_cast<int64_t>(s) * B + b;
#pragma unroll
            for (int g = 0; g < 4; ++g) act[e][g] = a.gates[row * K + g * H + col];
            c_cur[e] = a.c_all[row * H + col];
            c_old[e] = s > 0 ? a.c_all[(row - B) * H + col] : a.c0[bh];
            dy[e] = a.grad_y[row * H + col];
          }
        }
      }
    };
    auto finish = [&](int base, int rows, const float* sums) {
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int idx = threadIdx.x + e * kThreads;
        if (idx < rows * HC) {
          const int m = idx / HC;
          const int u = idx % HC;
          const int b = base + m;
          const int col = col0 + u;
          const int64_t bh = static_cast<int64_t>(b) * H + col;
          float recurrent = 0.0f;
          if (sums != nullptr) {
#pragma unroll
            for (int w = 0; w < kWarps; ++w) recurrent += sums[(w * MC + m) * NW + u];
          }
          const float dh_in = s + 1 < length[e] ? recurrent : dh_old[e];
          a.grad_h0[bh] = dh_in;
          if (s < 0) continue;
          const int64_t row = static_cast<int64_t>(s) * B + b;
          float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          float dc_out = dc_old[e];
          if (s < length[e]) {
            const float i = act[e][0], f = act[e][1], g = act[e][2], o = act[e][3];
            const float dh = dh_in + dy[e];
            const float tc = tanhf(c_cur[e]);
            const float dc = dc_old[e] + dh * o * (1.0f - tc * tc);
            d[0] = dc * g * i * (1.0f - i);
            d[1] = dc * c_old[e] * f * (1.0f - f);
            d[2] = dc * i * (1.0f - g * g);
            d[3] = dh * tc * o * (1.0f - o);
            dc_out = dc * f;
          }
          a.grad_c0[bh] = dc_out;
#pragma unroll
          for (int g = 0; g < 4; ++g) {
            a.grad_gates[row * K + g * H + col] = d[g];
            g_here[static_cast<int64_t>(b) * K + g * H + col] = Storage<T>::store(d[g]);
          }
          if (u == 0 && s > 0) {  // the next step's inputs, one prefetch per segment of HC units
#pragma unroll
            for (int g = 0; g < 4; ++g) prefetch_l2(a.gates + (row - B) * K + g * H + col);
            prefetch_l2(a.grad_y + (row - B) * H + col);
            if (s > 1) prefetch_l2(a.c_all + (row - 2 * B) * H + col);
          }
        }
      }
    };
    step_product<T, NW>(g_later, B, K, p.k_chunk, weights, tiles, partials, !last, prefetch, finish);
    if (s >= 0) grid.sync();  // g_here, grad_h0 and grad_c0 are complete before the next step reads them
  }
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

template <typename T, int HC>
struct Kernels {
  static constexpr int kForwardNW = 4 * HC;
  static constexpr int kBackwardNW = backward_rows<T, HC>();
  static const void* forward() { return reinterpret_cast<const void*>(&lstm_forward_kernel<T, HC>); }
  static const void* backward() { return reinterpret_cast<const void*>(&lstm_backward_kernel<T, HC>); }
  static SmemLayout forward_smem(int hidden, int k_chunk) { return smem_layout<T, kForwardNW>(hidden, k_chunk); }
  static SmemLayout backward_smem(int hidden, int k_chunk) {
    return smem_layout<T, kBackwardNW>(4 * hidden, k_chunk);
  }
};

// Co-resident CTAs of `kernel` with `smem` bytes on the current device.
int coresident_blocks(const void* kernel, std::size_t smem, int sms, int* error) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  *error = static_cast<int>(err);
  return err == cudaSuccess ? per_sm * sms : 0;
}

// The largest k_chunk (a multiple of 128 dividing k, at most 1024) with which `blocks` CTAs of `kernel` are
// co-resident (the occupancy query also counts shared memory the system reserves per CTA), or 0. The kernel's
// dynamic shared memory cap is raised to the device's opt-in maximum here, once per device (a per-device attribute:
// launches then need no per-call setting that concurrent callers with other hidden sizes could race on).
template <typename Layout>
int pick_k_chunk(const void* kernel, int k, int blocks, std::size_t max_smem, int sms, Layout layout, int* error) {
  *error = static_cast<int>(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_smem)));
  for (int kc = k < 1024 ? k : 1024; kc >= 128 && *error == 0; kc -= 128) {
    if (k % kc != 0 || layout(kc).total > max_smem) continue;
    if (coresident_blocks(kernel, layout(kc).total, sms, error) >= blocks) return kc;
  }
  return 0;
}

template <typename T, int HC>
Plan try_plan(int hidden, std::size_t max_smem, int sms, int* error) {
  using K = Kernels<T, HC>;
  Plan plan;
  plan.hidden_per_block = HC;
  plan.blocks = hidden / HC;
  plan.k_chunk_forward = pick_k_chunk(K::forward(), hidden, plan.blocks, max_smem, sms,
                                      [&](int kc) { return K::forward_smem(hidden, kc); }, error);
  if (*error != 0) return plan;
  plan.k_chunk_backward = pick_k_chunk(K::backward(), 4 * hidden, plan.blocks, max_smem, sms,
                                       [&](int kc) { return K::backward_smem(hidden, kc); }, error);
  if (*error != 0) return plan;
  if (plan.k_chunk_forward == 0 || plan.k_chunk_backward == 0) {
    plan.reason = "the weight slices of hidden_size / 8 CTAs do not fit co-resident on this device";
    return plan;
  }
  plan.smem_forward = K::forward_smem(hidden, plan.k_chunk_forward).total;
  plan.smem_backward = K::backward_smem(hidden, plan.k_chunk_backward).total;
  return plan;
}

template <typename T>
Plan plan_dtype(int hidden, std::size_t max_smem, int sms, int* error) {
  // The fewest hidden units per CTA that fit (more CTAs: less work per step each; HC >= 4: a 16-wide wmma tile).
  Plan plan = try_plan<T, 4>(hidden, max_smem, sms, error);
  if (plan.reason == nullptr || *error != 0) return plan;
  return try_plan<T, 8>(hidden, max_smem, sms, error);
}

Plan compute_plan(int hidden, ScalarType dtype, int device, int* error) {
  Plan plan;
  *error = 0;
  int major = 0, cooperative = 0, sms = 0, max_smem = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) {
    *error = static_cast<int>(err);
    plan.reason = "CUDA error";
    return plan;
  }
  if (major < 8) {
    plan.reason = "needs compute capability 8.0 or newer";
  } else if (!cooperative) {
    plan.reason = "the device cannot launch cooperative kernels";
  } else if (hidden <= 0 || hidden % 128 != 0) {
    plan.reason = "hidden_size must be a positive multiple of 128";
  } else {
    switch (dtype) {
      case ScalarType::kFloat32:
        return plan_dtype<float>(hidden, max_smem, sms, error);
      case ScalarType::kFloat16:
        return plan_dtype<__half>(hidden, max_smem, sms, error);
      case ScalarType::kBFloat16:
        return plan_dtype<__nv_bfloat16>(hidden, max_smem, sms, error);
    }
  }
  return plan;
}

// plan_for raised the kernels' shared memory cap on this device and checked that every CTA is co-resident; a
// cooperative launch fails (cudaErrorCooperativeLaunchTooLarge) rather than hangs if that no longer holds.
template <typename T>
int launch_forward(const ForwardArgs& args, const Plan& plan, Stream stream) {
  ForwardParams params{args, plan.k_chunk_forward};
  void* kernel_args[] = {&params};
  const void* kernel = plan.hidden_per_block == 4 ? Kernels<T, 4>::forward() : Kernels<T, 8>::forward();
  return static_cast<int>(cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kThreads), kernel_args,
                                                      plan.smem_forward, stream));
}

template <typename T>
int launch_backward(const BackwardArgs& args, const Plan& plan, Stream stream) {
  BackwardParams params{args, plan.k_chunk_backward};
  void* kernel_args[] = {&params};
  const void* kernel = plan.hidden_per_block == 4 ? Kernels<T, 4>::backward() : Kernels<T, 8>::backward();
  return static_cast<int>(cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kThreads), kernel_args,
                                                      plan.smem_backward, stream));
}

}  // namespace

Plan plan_for(int hidden, ScalarType dtype, int device, int* error) {
  static std::mutex mutex;
  static auto* cache = new std::map<std::tuple<int, int, int>, Plan>();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, static_cast<int>(dtype), hidden);
  const auto found = cache->find(key);
  if (found != cache->end()) {
    *error = 0;
    return found->second;
  }
  int current = 0;
  cudaError_t err = cudaGetDevice(&current);
  if (err == cudaSuccess && current != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    *error = static_cast<int>(err);
    Plan plan;
    plan.reason = "CUDA error";
    return plan;
  }
  const Plan plan = compute_plan(hidden, dtype, device, error);
  if (current != device) cudaSetDevice(current);
  if (*error == 0) {
    (*cache)[key] = plan;
  } else {
    cudaGetLastError();  // the failed query's error is reported through *error, not left for the next launch
  }
  return plan;
}

int forward(const ForwardArgs& args, ScalarType dtype, const Plan& plan, Stream stream) {
  switch (dtype) {
    case ScalarType::kFloat32:
      return launch_forward<float>(args, plan, stream);
    case ScalarType::kFloat16:
      return launch_forward<__half>(args, plan, stream);
    case ScalarType::kBFloat16:
      return launch_forward<__nv_bfloat16>(args, plan, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int backward(const BackwardArgs& args, ScalarType dtype, const Plan& plan, Stream stream) {
  switch (dtype) {
    case ScalarType::kFloat32:
      return launch_backward<float>(args, plan, stream);
    case ScalarType::kFloat16:
      return launch_backward<__half>(args, plan, stream);
    case ScalarType::kBFloat16:
      return launch_backward<__nv_bfloat16>(args, plan, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace lstm
}  // namespace dlkernels
