// group_assign CUDA kernels and their launchers; interface and conventions in
// group_assign.cuh, the tiling constants and device helpers in
// group_assign_device.cuh, the host-side planning in group_assign_plan.cuh.
//
// Forward, five launches:
//   1. normalise_rows: q̂ = q/(‖q‖+ε) into the workspace, one CTA per (b, n).
//   2. assign: a CTA owns a tile of pixels of one batch; each warp takes one
//      pixel at a time, streams its k row through registers (256-element
//      chunks) and dots it with all N rows of q̂ (shared memory when N·C fits,
//      else L1/L2), adds the noise, picks the argmax over N (sequential scan,
//      first maximum wins, exactly as the CPU kernel), and writes the pixel's
//      token label. The CTA then writes its (N × tile) slice of the one-hot
//      assign with coalesced stores.
//   3. pool_partial: since A is one-hot per pixel, out[b,n] = Σ_{p: label=n} v[b,p]
//      / (r+1). A CTA owns (b, n, pixel segment): it compacts the matching
//      pixels of its segment (ballot + prefix) and sums their v rows in pixel
//      order into a per-segment partial.
//   4. nonfinite_total, 5. pool_reduce: sums the segment partials in segment
//      order, scales by 1/(r+1), writes out and counts.
// Non-finite inputs follow the reference (rexfast/ops/group_assign/reference.py):
// a pixel whose softmax column is NaN gets label -1 and a NaN assignment column
// and makes its batch item's counts NaN; a non-finite v value of a pixel reaches
// the other tokens' outputs as NaN (0 * inf), counted per (token, column) while
// pooling.
// Backward, five launches:
//   1. normalise_rows (q̂) and bwd_token_prep (1/(r+1), c = dout·out, and the
//      dv rows dout/(r+1) in the input dtype).
//   2. bwd_pixels: the same tiling as `assign`; per pixel it recomputes S, Z,
//      the softmax and argmax, forms dY, dZ, dS, writes dv (the winning
//      token's dv row) and dk, accumulates dτ, and stores dS/‖k‖ (B,N,P) in
//      the workspace for dq.
//   3. dq_partial: dq̂ = (dS/‖k‖) k as a tiled product over pixel segments
//      (fixed order), partials per segment.
//   4. dq_finalize: reduce the partials in order, l2n backward → dq.
//   5. dtau_finalize: one CTA sums the per-tile dτ partials in a fixed order.
#include "group_assign.cuh"

#include <algorithm>

#include "group_assign_device.cuh"
#include "group_assign_plan.cuh"

namespace rexfast {
namespace cuda {

using namespace group_assign_detail;  // tiling, helpers and plans (group_assign_device.cuh, group_assign_plan.cuh)

namespace {

// ---------------------------------------------------------------- kernels
// q̂[bn, :] = q[b, n, :] / (‖q[b, n, :]‖ + ε); grid B*N.
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    normalise_rows_kernel(const T* __restrict__ q, int64_t q_sb, int64_t q_sn, int N, int C, A* __restrict__ qhat) {
  __shared__ A red[32];
  const int64_t bn = blockIdx.x;
  const int64_t b = bn / N, n = bn % N;
  const T* row = q + b * q_sb + n * q_sn;
  A s = 0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const A x = static_cast<A>(Cvt<T>::to(row[c]));
    s += x * x;
  }
  s = block_sum(s, red);
  const A den = dsqrt(s) + A(kL2nEps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) qhat[bn * C + c] = static_cast<A>(Cvt<T>::to(row[c])) / den;
}

// Shared-memory layout of the assign kernel, in elements of A / int.
struct FwdSmem {
  int tile;
  bool q_smem, has_noise;
  int64_t N, C;
  __host__ __device__ size_t q_elems() const { return q_smem ? static_cast<size_t>(N * C) : 0; }
  __host__ __device__ size_t g_elems() const { return has_noise ? static_cast<size_t>(N * tile) : 0; }
  __host__ __device__ size_t z_elems() const { return static_cast<size_t>(kWarps * N); }
  template <typename A>
  size_t bytes() const {
    return (q_elems() + g_elems() + z_elems()) * sizeof(A) + static_cast<size_t>(tile) * sizeof(int);
  }
};

extern __shared__ __align__(16) unsigned char g_smem[];

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    assign_kernel(GroupAssignFwdParams<T> p, FwdSmem lay, int64_t tiles, const A* __restrict__ qhat,
                  int* __restrict__ labels, int* __restrict__ poison) {
  const int N = static_cast<int>(p.N), C = static_cast<int>(p.C);
  const int64_t P = p.P;
  const int tile = lay.tile;
  const int64_t b = blockIdx.x / tiles;
  const int64_t p0 = (blockIdx.x % tiles) * tile;
  const int tl = static_cast<int>(min(static_cast<int64_t>(tile), P - p0));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  A* qs = reinterpret_cast<A*>(g_smem);
  A* gs = qs + lay.q_elems();
  A* zs = gs + lay.g_elems();
  int* labs = reinterpret_cast<int*>(zs + lay.z_elems());

  const A* qb = qhat + b * N * C;
  if (lay.q_smem) {
    for (int i = threadIdx.x; i < N * C; i += blockDim.x) qs[i] = qb[i];
    qb = qs;
  }
  const A* noise = p.noise;
  if (noise) {
    for (int i = threadIdx.x; i < N * tile; i += blockDim.x) {
      const int n = i / tile, pl = i % tile;
      gs[i] = pl < tl ? noise[(b * N + n) * P + p0 + pl] : A(0);
    }
  }
  __syncthreads();

  const A inv_tau = A(1) / *p.tau;
  A* z = zs + warp * N;
  for (int pl = warp; pl < tl; pl += kWarps) {
    const int64_t pix = p0 + pl;
    const T* krow = p.k + b * p.k_sb + pix * p.k_sp;
    const A norm2 = warp_row_dots<T, A>(krow, C, qb, C, N, z, lane);
    __syncwarp();
    const A inv_d = A(1) / (dsqrt(norm2) + A(kL2nEps));
    for (int n = lane; n < N; n += 32) {
      A logit = z[n] * inv_d;
      if (noise) logit += gs[n * tile + pl];
      else if (p.use_key) logit += draw_gumbel<A>(p.key, static_cast<uint32_t>((b * N + n) * P + pix));
      z[n] = logit * inv_tau;
    }
    __syncwarp();
    const Winner<A> win = first_winner(z, N);
    if (lane == 0) {
      // label -1: a NaN softmax column (NaN assignment; the batch item's counts become NaN)
      const int label = win.poisoned ? -1 : win.index;
      labs[pl] = label;
      labels[b * P + pix] = label;
      if (win.poisoned) poison[b] = 1;  // every writer stores 1: a benign race
    }
    __syncwarp();
  }
  __syncthreads();
  T* assign = p.assign + b * N * P + p0;
  for (int i = threadIdx.x; i < N * tl; i += blockDim.x) {
    const int n = i / tl, pl = i % tl;
    const A value = labs[pl] < 0 ? A(NAN) : static_cast<A>(labs[pl] == n ? 1 : 0);
    assign[static_cast<int64_t>(n) * P + pl] = Cvt<T>::from(value);
  }
}

// Partial Σ v over the pixels of one segment that belong to token n.
// grid: B*N*segs, block = (b*N + n)*segs + s.
template <typename T, typename A>
__global__ void __launch_bounds__(kPoolThreads)
    pool_partial_kernel(const T* __restrict__ v, int64_t v_sb, int64_t v_sp, const int* __restrict__ labels, int N,
                        int64_t P, int D, int64_t segs, int64_t seg_len, A* __restrict__ partial,
                        A* __restrict__ hits, int* __restrict__ nonfinite) {
  __shared__ int idx[kPoolThreads];
  __shared__ int wcount[kPoolThreads / 32];
  const int64_t blk = blockIdx.x;
  const int64_t s = blk % segs, bn = blk / segs;
  const int64_t b = bn / N;
  const int n = static_cast<int>(bn % N);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t pbeg = s * seg_len, pend = min(P, pbeg + seg_len);
  const int* lab = labels + b * P;
  const T* vb = v + b * v_sb;
  A* dst = partial + blk * D;  // blk == (b*N + n)*segs + s
  int total = 0;
  for (int d0 = 0; d0 < D; d0 += kPoolThreads * kPoolDPT) {
    A acc[kPoolDPT];
    int nf[kPoolDPT];  // non-finite v values among the member rows (they reach the other tokens as NaN)
#pragma unroll
    for (int j = 0; j < kPoolDPT; ++j) acc[j] = 0, nf[j] = 0;
    total = 0;
    for (int64_t c0 = pbeg; c0 < pend; c0 += kPoolThreads) {
      const int64_t pix = c0 + threadIdx.x;
      const bool hit = pix < pend && lab[pix] == n;
      const unsigned mask = __ballot_sync(0xffffffffu, hit);
      if (lane == 0) wcount[warp] = __popc(mask);
      __syncthreads();
      int off = 0, m = 0;
#pragma unroll
      for (int w = 0; w < kPoolThreads / 32; ++w) {
        if (w < warp) off += wcount[w];
        m += wcount[w];
      }
      if (hit) idx[off + __popc(mask & ((1u << lane) - 1u))] = static_cast<int>(pix - c0);
      __syncthreads();
#pragma unroll 4
      for (int i = 0; i < m; ++i) {
        const T* row = vb + (c0 + idx[i]) * v_sp;
#pragma unroll
        for (int j = 0; j < kPoolDPT; ++j) {
          const int d = d0 + static_cast<int>(threadIdx.x) + j * kPoolThreads;
          if (d < D) {
            const A x = static_cast<A>(Cvt<T>::to(row[d]));
            acc[j] += x;
            nf[j] += isfinite(x) ? 0 : 1;
          }
        }
      }
      total += m;
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kPoolDPT; ++j) {
      const int d = d0 + static_cast<int>(threadIdx.x) + j * kPoolThreads;
      if (d < D) {
        dst[d] = acc[j];
        nonfinite[blk * D + d] = nf[j];
      }
    }
  }
  if (threadIdx.x == 0) hits[blk] = static_cast<A>(total);
}

// nonfinite_total[b, d] = Σ_{n, s} nonfinite[(b*N + n)*segs + s, d]; grid B.
__global__ void __launch_bounds__(kRowThreads)
    nonfinite_total_kernel(const int* __restrict__ nonfinite, int64_t N, int64_t segs, int D,
                           int* __restrict__ total) {
  const int64_t b = blockIdx.x;
  const int* src = nonfinite + b * N * segs * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    int t = 0;
    for (int64_t i = 0; i < N * segs; ++i) t += src[i * D + d];
    total[b * D + d] = t;
  }
}

// out[b,n] = (Σ_s partial) / (r + 1), counts[b,n] = r; grid B*N.
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    pool_reduce_kernel(const A* __restrict__ partial, const A* __restrict__ hits, int64_t segs, int N, int D,
                       const int* __restrict__ poison, const int* __restrict__ nonfinite,
                       const int* __restrict__ nonfinite_total, T* __restrict__ out, float* __restrict__ counts) {
  const int64_t bn = blockIdx.x, b = bn / N;
  A count = 0;
  for (int64_t s = 0; s < segs; ++s) count += hits[bn * segs + s];
  if (poison[b]) count = A(NAN);  // a NaN softmax column in this batch item: NaN counts, as the reference
  const A scale = A(1) / (count + A(1));
  const A* src = partial + bn * segs * D;
  const int* nf = nonfinite + bn * segs * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    A acc = 0;
    int own = 0;
    for (int64_t s = 0; s < segs; ++s) acc += src[s * D + d], own += nf[s * D + d];
    // a non-finite v value of another token's pixel: 0 * inf or 0 * NaN in Â·v
    out[bn * D + d] = Cvt<T>::from(nonfinite_total[b * D + d] > own ? A(NAN) : acc * scale);
  }
  if (threadIdx.x == 0) counts[bn] = static_cast<float>(count);
}

// Per-token backward constants; grid B*N.
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    bwd_token_prep_kernel(const A* __restrict__ dout, const A* __restrict__ out, const float* __restrict__ counts,
                          int D, A* __restrict__ inv_r1, A* __restrict__ cvec, T* __restrict__ dv_rows) {
  __shared__ A red[32];
  const int64_t bn = blockIdx.x;
  const A ir = A(1) / (static_cast<A>(counts[bn]) + A(1));
  A c = 0;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const A g = dout[bn * D + d];
    c += g * out[bn * D + d];
    dv_rows[bn * D + d] = Cvt<T>::from(g * ir);
  }
  c = block_sum(c, red);
  if (threadIdx.x == 0) {
    inv_r1[bn] = ir;
    cvec[bn] = c;
  }
}

struct BwdSmem {
  int tile;
  bool q_smem, o_smem, has_noise;
  int64_t N, C, D;
  __host__ __device__ size_t q_elems() const { return q_smem ? static_cast<size_t>(N * C) : 0; }
  __host__ __device__ size_t o_elems() const { return o_smem ? static_cast<size_t>(N * D) : 0; }
  __host__ __device__ size_t a_elems() const { return static_cast<size_t>(N * tile); }
  __host__ __device__ size_t g_elems() const { return has_noise ? static_cast<size_t>(N * tile) : 0; }
  __host__ __device__ size_t w_elems() const { return static_cast<size_t>(4 * kWarps * N + kWarps); }
  template <typename A>
  size_t bytes() const {
    return (q_elems() + o_elems() + a_elems() + g_elems() + w_elems()) * sizeof(A);
  }
};

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    bwd_pixels_kernel(GroupAssignBwdParams<T> p, BwdSmem lay, int64_t tiles, const A* __restrict__ qhat,
                      const A* __restrict__ inv_r1, const A* __restrict__ cvec, const T* __restrict__ dv_rows,
                      A* __restrict__ dsk, A* __restrict__ dtau_part) {
  const int N = static_cast<int>(p.N), C = static_cast<int>(p.C), D = static_cast<int>(p.D);
  const int64_t P = p.P;
  const int tile = lay.tile;
  const int64_t b = blockIdx.x / tiles;
  const int64_t p0 = (blockIdx.x % tiles) * tile;
  const int tl = static_cast<int>(min(static_cast<int64_t>(tile), P - p0));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  A* qs = reinterpret_cast<A*>(g_smem);
  A* os = qs + lay.q_elems();
  A* das = os + lay.o_elems();  // dA tile, then dS/‖k‖ in place
  A* gs = das + lay.a_elems();
  A* ws = gs + lay.g_elems();
  A* sim = ws + (4 * warp + 0) * N;
  A* zsh = ws + (4 * warp + 1) * N;  // Z
  A* y = ws + (4 * warp + 2) * N;
  A* ds = ws + (4 * warp + 3) * N;  // dot(dout_n, v), then dY, then dS
  A* wdt = ws + 4 * kWarps * N;

  const A* qb = qhat + b * N * C;
  if (lay.q_smem) {
    for (int i = threadIdx.x; i < N * C; i += blockDim.x) qs[i] = qb[i];
    qb = qs;
  }
  const A* ob = p.dout + b * N * D;
  if (lay.o_smem) {
    for (int i = threadIdx.x; i < N * D; i += blockDim.x) os[i] = ob[i];
    ob = os;
  }
  for (int i = threadIdx.x; i < N * tile; i += blockDim.x) {
    const int n = i / tile, pl = i % tile;
    const int64_t at = (b * N + n) * P + p0 + pl;
    das[i] = pl >= tl ? A(0) : p.dassign_acc ? p.dassign_acc[at] : static_cast<A>(Cvt<T>::to(p.dassign[at]));
  }
  const A* noise = p.noise;
  if (noise) {
    for (int i = threadIdx.x; i < N * tile; i += blockDim.x) {
      const int n = i / tile, pl = i % tile;
      gs[i] = pl < tl ? noise[(b * N + n) * P + p0 + pl] : A(0);
    }
  }
  __syncthreads();

  const A inv_tau = A(1) / *p.tau;
  const A* ir_b = inv_r1 + b * N;
  const A* c_b = cvec + b * N;
  A dtau_lane = 0;
  for (int pl = warp; pl < tl; pl += kWarps) {
    const int64_t pix = p0 + pl;
    const T* krow = p.k + b * p.k_sb + pix * p.k_sp;
    const T* vrow = p.v + b * p.v_sb + pix * p.v_sp;
    const A norm2 = warp_row_dots<T, A>(krow, C, qb, C, N, sim, lane);
    warp_row_dots<T, A>(vrow, D, ob, D, N, ds, lane);
    __syncwarp();
    const A norm = dsqrt(norm2);
    const A inv_d = A(1) / (norm + A(kL2nEps));
    // Recompute the forward: similarities, logits, argmax.
    for (int n = lane; n < N; n += 32) {
      const A s = sim[n] * inv_d;
      sim[n] = s;
      A logit = s;
      if (noise) logit += gs[n * tile + pl];
      else if (p.use_key) logit += draw_gumbel<A>(p.key, static_cast<uint32_t>((b * N + n) * P + pix));
      zsh[n] = logit * inv_tau;
    }
    __syncwarp();
    // The forward's winner; a NaN column stays NaN through y (as in the reference).
    const Winner<A> win = first_winner(zsh, N);
    const int best = win.index;
    const A zb = win.max;
    __syncwarp();
    // Softmax over N; dY = dA + (dout·v − c)/(r+1).
    A den = 0;
    for (int n = lane; n < N; n += 32) {
      const A e = dexp(zsh[n] - zb);
      y[n] = e;
      den += e;
    }
    den = warp_sum(den);
    A wsum = 0;
    for (int n = lane; n < N; n += 32) {
      const A yn = y[n] / den;
      y[n] = yn;
      const A dyn = das[n * tile + pl] + (ds[n] - c_b[n]) * ir_b[n];
      ds[n] = dyn;
      wsum += yn * dyn;
    }
    const A weighted = warp_sum(wsum);
    // dZ = Y (dY − Σ Y dY), dτ −= dZ (Z − max Z), dS = dZ/τ.
    A dsim = 0;
    for (int n = lane; n < N; n += 32) {
      const A dz = y[n] * (ds[n] - weighted);
      dtau_lane -= dz * (zsh[n] - zb);
      const A dsn = dz * inv_tau;
      ds[n] = dsn;
      dsim += dsn * sim[n];
      das[n * tile + pl] = dsn * inv_d;
    }
    const A ds_dot_sim = warp_sum(dsim);
    __syncwarp();
    // dv: the winning token's row of dout/(r+1).
    {
      const T* src = dv_rows + (b * N + best) * static_cast<int64_t>(D);
      T* dst = p.dv + (b * P + pix) * D;
      for (int d = lane; d < D; d += 32) dst[d] = src[d];
    }
    // dk = (Σ_n dS_n q̂_n − k (Σ_n dS_n S_n)/‖k‖) / (‖k‖ + ε)
    const A radial = norm > A(0) ? ds_dot_sim / norm : A(0);
    T* dkrow = p.dk + (b * P + pix) * C;
    for (int c0 = 0; c0 < C; c0 += kRowChunk) {
      A acc[kKPL];
#pragma unroll
      for (int m = 0; m < kKPL; ++m) acc[m] = 0;
      for (int n = 0; n < N; ++n) {
        const A dsn = ds[n];
        const A* qn = qb + static_cast<int64_t>(n) * C;
#pragma unroll
        for (int m = 0; m < kKPL; ++m) {
          const int c = c0 + lane + 32 * m;
          if (c < C) acc[m] += dsn * qn[c];
        }
      }
#pragma unroll
      for (int m = 0; m < kKPL; ++m) {
        const int c = c0 + lane + 32 * m;
        if (c < C) {
          const A kc = static_cast<A>(Cvt<T>::to(krow[c]));
          dkrow[c] = Cvt<T>::from((acc[m] - kc * radial) * inv_d);
        }
      }
    }
    __syncwarp();
  }
  const A dtau_w = warp_sum(dtau_lane);
  if (lane == 0) wdt[warp] = dtau_w;
  __syncthreads();
  A* dskb = dsk + b * N * P + p0;
  for (int i = threadIdx.x; i < N * tl; i += blockDim.x) {
    const int n = i / tl, pl = i % tl;
    dskb[static_cast<int64_t>(n) * P + pl] = das[n * tile + pl];
  }
  if (threadIdx.x == 0) {
    A s = 0;
    for (int w = 0; w < kWarps; ++w) s += wdt[w];
    dtau_part[blockIdx.x] = s * inv_tau;
  }
}

// partial[b, s, n, c] = Σ_{p in segment s} dsk[b, n, p] k[b, p, c].
// grid: B * psplit * ntiles * ctiles; CTA tile kGN × kGC, pixel steps of kGP.
template <typename T, typename A>
__global__ void __launch_bounds__(kGThreads)
    dq_partial_kernel(const A* __restrict__ dsk, const T* __restrict__ k, int64_t k_sb, int64_t k_sp, int N,
                      int64_t P, int C, int64_t psplit, int64_t plen, int64_t ntiles, int64_t ctiles,
                      A* __restrict__ partial) {
  __shared__ A sa[kGP][kGN + 1];
  __shared__ A sb[kGP][kGC];
  int64_t blk = blockIdx.x;
  const int64_t ct = blk % ctiles;
  blk /= ctiles;
  const int64_t nt = blk % ntiles;
  blk /= ntiles;
  const int64_t s = blk % psplit;
  const int64_t b = blk / psplit;
  const int n0 = static_cast<int>(nt * kGN), c0 = static_cast<int>(ct * kGC);
  const int64_t pbeg = s * plen, pend = min(P, pbeg + plen);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const A* db = dsk + b * N * P;
  const T* kb = k + b * k_sb;
  A acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;
  for (int64_t pc = pbeg; pc < pend; pc += kGP) {
#pragma unroll
    for (int r = 0; r < (kGP * kGN) / kGThreads; ++r) {
      const int e = threadIdx.x + r * kGThreads;
      const int nn = e / kGP, pp = e % kGP;
      const int64_t pix = pc + pp;
      sa[pp][nn] = (n0 + nn < N && pix < pend) ? db[static_cast<int64_t>(n0 + nn) * P + pix] : A(0);
    }
#pragma unroll
    for (int r = 0; r < (kGP * kGC) / kGThreads; ++r) {
      const int e = threadIdx.x + r * kGThreads;
      const int pp = e / kGC, cc = e % kGC;
      const int64_t pix = pc + pp;
      sb[pp][cc] = (c0 + cc < C && pix < pend) ? static_cast<A>(Cvt<T>::to(kb[pix * k_sp + c0 + cc])) : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int pp = 0; pp < kGP; ++pp) {
      const A a0 = sa[pp][ty], a1 = sa[pp][ty + 16];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const A bv = sb[pp][tx + 16 * j];
        acc[0][j] += a0 * bv;
        acc[1][j] += a1 * bv;
      }
    }
    __syncthreads();
  }
  A* dst = partial + (b * psplit + s) * N * static_cast<int64_t>(C);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int n = n0 + ty + 16 * i;
    if (n >= N) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = c0 + tx + 16 * j;
      if (c < C) dst[static_cast<int64_t>(n) * C + c] = acc[i][j];
    }
  }
}

// dq = dq̂/(‖q‖+ε) − q (q·dq̂)/(‖q‖ (‖q‖+ε)²) (last term 0 at q = 0); grid B*N.
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    dq_finalize_kernel(const T* __restrict__ q, int64_t q_sb, int64_t q_sn, const A* __restrict__ partial,
                       int64_t psplit, int N, int C, T* __restrict__ dq) {
  __shared__ A red[32];
  const int64_t bn = blockIdx.x;
  const int64_t b = bn / N, n = bn % N;
  const T* row = q + b * q_sb + n * q_sn;
  const A* part = partial + (b * psplit * N + n) * static_cast<int64_t>(C);
  const int64_t sstride = static_cast<int64_t>(N) * C;
  A n2 = 0, proj = 0;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const A x = static_cast<A>(Cvt<T>::to(row[c]));
    A g = 0;
    for (int64_t s = 0; s < psplit; ++s) g += part[s * sstride + c];
    n2 += x * x;
    proj += x * g;
  }
  n2 = block_sum(n2, red);
  proj = block_sum(proj, red);
  const A qnorm = dsqrt(n2);
  const A qden = qnorm + A(kL2nEps);
  const A radial = qnorm > A(0) ? proj / (qnorm * qden * qden) : A(0);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const A x = static_cast<A>(Cvt<T>::to(row[c]));
    A g = 0;
    for (int64_t s = 0; s < psplit; ++s) g += part[s * sstride + c];
    dq[bn * C + c] = Cvt<T>::from(g / qden - x * radial);
  }
}

template <typename A>
__global__ void __launch_bounds__(kRowThreads) dtau_finalize_kernel(const A* __restrict__ part, int64_t count,
                                                                     A* __restrict__ dtau) {
  __shared__ A red[32];
  A s = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += part[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) *dtau = s;
}

}  // namespace


template <typename T>
size_t group_assign_fwd_workspace_bytes(int64_t B, int64_t N, int64_t P, int64_t C, int64_t D) {
  if (!sizes_ok(B, N, P, C, D)) return 0;
  return fwd_work<T>(nullptr, B, N, P, C, D).bytes;
}

template <typename T>
size_t group_assign_bwd_workspace_bytes(int64_t B, int64_t N, int64_t P, int64_t C, int64_t D) {
  if (!sizes_ok(B, N, P, C, D)) return 0;
  return bwd_work<T>(nullptr, B, N, P, C, D).bytes;
}

template <typename T>
cudaError_t group_assign_fwd(const GroupAssignFwdParams<T>& p, cudaStream_t stream) {
  using A = typename GroupAssignAcc<T>::type;
  const int64_t B = p.B, N = p.N, P = p.P, C = p.C, D = p.D;
  if (!sizes_ok(B, N, P, C, D)) return cudaErrorInvalidValue;
  if (!p.q || !p.k || !p.v || !p.tau || !p.out || !p.assign || !p.counts || !p.workspace)
    return cudaErrorInvalidValue;
  const FwdWork<T> w = fwd_work<T>(p.workspace, B, N, P, C, D);
  if (p.workspace_bytes < w.bytes) return cudaErrorInvalidValue;

  size_t limit = 0;
  cudaError_t err = smem_limit(&limit);
  if (err != cudaSuccess) return err;
  FwdSmem lay{kMaxTile, false, p.noise != nullptr, N, C};
  while (lay.tile > kMinTile && lay.bytes<A>() > limit) lay.tile /= 2;
  if (lay.bytes<A>() > limit) return cudaErrorInvalidConfiguration;
  lay.q_smem = true;
  if (lay.bytes<A>() > std::min(limit, kSmemCap)) lay.q_smem = false;
  const size_t smem = lay.bytes<A>();
  const int64_t tiles = ceil_div(P, lay.tile);
  if (!grid_ok(B * tiles) || !grid_ok(B * N * w.pool.segs)) return cudaErrorInvalidValue;

  normalise_rows_kernel<T, A><<<static_cast<unsigned>(B * N), kRowThreads, 0, stream>>>(
      p.q, p.q_sb, p.q_sn, static_cast<int>(N), static_cast<int>(C), w.qhat);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = cudaMemsetAsync(w.poison, 0, static_cast<size_t>(B) * sizeof(int), stream)) != cudaSuccess) return err;
  if ((err = allow_smem(assign_kernel<T, A>, smem)) != cudaSuccess) return err;
  assign_kernel<T, A><<<static_cast<unsigned>(B * tiles), kThreads, smem, stream>>>(p, lay, tiles, w.qhat, w.labels,
                                                                                   w.poison);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  pool_partial_kernel<T, A><<<static_cast<unsigned>(B * N * w.pool.segs), kPoolThreads, 0, stream>>>(
      p.v, p.v_sb, p.v_sp, w.labels, static_cast<int>(N), P, static_cast<int>(D), w.pool.segs, w.pool.seg_len,
      w.partial, w.hits, w.nonfinite);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  nonfinite_total_kernel<<<static_cast<unsigned>(B), kRowThreads, 0, stream>>>(w.nonfinite, N, w.pool.segs,
                                                                              static_cast<int>(D), w.nonfinite_total);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  pool_reduce_kernel<T, A><<<static_cast<unsigned>(B * N), kRowThreads, 0, stream>>>(
      w.partial, w.hits, w.pool.segs, static_cast<int>(N), static_cast<int>(D), w.poison, w.nonfinite,
      w.nonfinite_total, p.out, p.counts);
  return cudaGetLastError();
}

template <typename T>
cudaError_t group_assign_bwd(const GroupAssignBwdParams<T>& p, cudaStream_t stream) {
  using A = typename GroupAssignAcc<T>::type;
  const int64_t B = p.B, N = p.N, P = p.P, C = p.C, D = p.D;
  if (!sizes_ok(B, N, P, C, D)) return cudaErrorInvalidValue;
  if (!p.q || !p.k || !p.v || !p.tau || !p.dout || (!p.dassign && !p.dassign_acc) || !p.out || !p.counts ||
      !p.dq || !p.dk || !p.dv || !p.dtau || !p.workspace)
    return cudaErrorInvalidValue;
  const BwdWork<T> w = bwd_work<T>(p.workspace, B, N, P, C, D);
  if (p.workspace_bytes < w.bytes) return cudaErrorInvalidValue;

  size_t limit = 0;
  cudaError_t err = smem_limit(&limit);
  if (err != cudaSuccess) return err;
  BwdSmem lay{kMaxTile, false, false, p.noise != nullptr, N, C, D};
  while (lay.tile > kMinTile && lay.bytes<A>() > limit) lay.tile /= 2;
  if (lay.bytes<A>() > limit) return cudaErrorInvalidConfiguration;
  const size_t cap = std::min(limit, kSmemCap);
  lay.q_smem = true;
  if (lay.bytes<A>() > cap) lay.q_smem = false;
  lay.o_smem = true;
  if (lay.bytes<A>() > cap) lay.o_smem = false;
  const size_t smem = lay.bytes<A>();
  const int64_t tiles = ceil_div(P, lay.tile);
  const GemmPlan& g = w.gemm;
  const int64_t gemm_blocks = B * g.psplit * g.ntiles * g.ctiles;
  if (!grid_ok(B * tiles) || !grid_ok(gemm_blocks)) return cudaErrorInvalidValue;

  normalise_rows_kernel<T, A><<<static_cast<unsigned>(B * N), kRowThreads, 0, stream>>>(
      p.q, p.q_sb, p.q_sn, static_cast<int>(N), static_cast<int>(C), w.qhat);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  bwd_token_prep_kernel<T, A><<<static_cast<unsigned>(B * N), kRowThreads, 0, stream>>>(
      p.dout, p.out, p.counts, static_cast<int>(D), w.inv_r1, w.cvec, w.dv_rows);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = allow_smem(bwd_pixels_kernel<T, A>, smem)) != cudaSuccess) return err;
  bwd_pixels_kernel<T, A><<<static_cast<unsigned>(B * tiles), kThreads, smem, stream>>>(
      p, lay, tiles, w.qhat, w.inv_r1, w.cvec, w.dv_rows, w.dsk, w.dtau_part);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  dq_partial_kernel<T, A><<<static_cast<unsigned>(gemm_blocks), kGThreads, 0, stream>>>(
      w.dsk, p.k, p.k_sb, p.k_sp, static_cast<int>(N), P, static_cast<int>(C), g.psplit, g.plen, g.ntiles, g.ctiles,
      w.dq_part);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  dq_finalize_kernel<T, A><<<static_cast<unsigned>(B * N), kRowThreads, 0, stream>>>(
      p.q, p.q_sb, p.q_sn, w.dq_part, g.psplit, static_cast<int>(N), static_cast<int>(C), p.dq);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  dtau_finalize_kernel<A><<<1, kRowThreads, 0, stream>>>(w.dtau_part, B * tiles, p.dtau);
  return cudaGetLastError();
}

#define REXFAST_GROUP_ASSIGN_INSTANTIATE(T)                                                                   \
  template size_t group_assign_fwd_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t, int64_t);          \
  template size_t group_assign_bwd_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t, int64_t);          \
  template cudaError_t group_assign_fwd<T>(const GroupAssignFwdParams<T>&, cudaStream_t);                    \
  template cudaError_t group_assign_bwd<T>(const GroupAssignBwdParams<T>&, cudaStream_t);

REXFAST_GROUP_ASSIGN_INSTANTIATE(float)
REXFAST_GROUP_ASSIGN_INSTANTIATE(double)
REXFAST_GROUP_ASSIGN_INSTANTIATE(__half)
REXFAST_GROUP_ASSIGN_INSTANTIATE(__nv_bfloat16)

#undef REXFAST_GROUP_ASSIGN_INSTANTIATE

}  // namespace cuda
}  // namespace rexfast
