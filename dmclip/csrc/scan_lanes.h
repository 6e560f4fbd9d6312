// The kernels vectorised over channels: one lane per channel, W neighbouring channels per work item.
//
// No include guard: selective_scan.cpp includes this file once per instruction set, each time inside a
// `#pragma GCC target` region and with its own namespace (DMCLIP_ISA_NS) and lane count (DMCLIP_LANES);
// a runtime check picks which copy runs. Nothing here allocates or starts threads (the drivers in
// selective_scan.cpp do), so no library template is instantiated with an instruction set the CPU may lack.
//
// Why channels in lanes: the recurrence is sequential in time and the state axis is short (N = 16), but
// every channel is independent. With channels in lanes the per-step work (softplus, silu, D skip) is vector
// code, the readout <C_t, x_t> needs no horizontal sum, B_t and C_t are scalars broadcast to all lanes, and
// any N works without padding.
namespace DMCLIP_ISA_NS {

constexpr int W = DMCLIP_LANES;
template <typename T>
struct VT { typedef T V __attribute__((vector_size(W * sizeof(T)))); };
template <typename T>
using Vec = typename VT<T>::V;
typedef Vec<float> vf;
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
template <typename T>
inline Vec<T> vzero() { return Vec<T>{}; }
template <typename T>
inline Vec<T> vsplat(T x) { return vzero<T>() + x; }
template <typename T>
inline Vec<T> vload(const T* p, int n) {  // n < W: the missing lanes are 0
  Vec<T> v = vzero<T>();
  if (n == W) std::memcpy(&v, p, sizeof(v));  // a constant size: one vector load, not a call
  else std::memcpy(&v, p, n * sizeof(T));
  return v;
}
template <typename T>
inline void vstore(T* p, const Vec<T>& v, int n) {
  if (n == W) std::memcpy(p, &v, sizeof(v));
  else std::memcpy(p, &v, n * sizeof(T));
}
DMCLIP_INLINE vf vmax(vf a, vf b) {
#if DMCLIP_AVX512
  return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif DMCLIP_AVX2
  return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#else
  return a < b ? b : a;
#endif
}
DMCLIP_INLINE vf vmin(vf a, vf b) {
#if DMCLIP_AVX512
  return (vf)_mm512_min_ps((__m512)a, (__m512)b);
#elif DMCLIP_AVX2
  return (vf)_mm256_min_ps((__m256)a, (__m256)b);
#else
  return a > b ? b : a;
#endif
}
template <typename T>
inline T vsum(const Vec<T>& v) {
  T s = 0;
  for (int k = 0; k < W; ++k) s += v[k];
  return s;
}

inline Vec<double> vexp(Vec<double> x) {  // float64 serves gradcheck, not speed
  for (int k = 0; k < W; ++k) x[k] = std::exp(x[k]);
  return x;
}

// The decays exp(dt A) = 2^(dt A log2 e), with A log2 e computed once per item: x = k + f with k = round(x)
// exact, 2^f on [-1/2, 1/2] by a degree-5 polynomial with p(0) = 1, minimax in relative error (7e-8, 2.2e-7
// evaluated in float32; the fit: scripts/fit_exp2.py), times 2^k. Nine vector operations instead of
// Cephes' sixteen plus clamps: this is the scan's inner loop. The extra
// rounding of A log2 e costs |dt A| * 1e-7 relative, where the decay exp(dt A) is that much smaller anyway.
constexpr float kLog2e = 1.44269504088896341f;
DMCLIP_INLINE vf vexp2(vf x) {
#if DMCLIP_AVX512
  const vf k = (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  x = vmin(vmax(x, vsplat(-126.0f)), vsplat(126.0f));  // 2^k from exponent bits: k in the normal range
#if DMCLIP_AVX2
  const vf k = (vf)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vf k = (x + 12582912.0f) - 12582912.0f;
#endif
#endif
  const vf f = x - k;
  vf p = vsplat(1.3202981791e-03f);
  p = p * f + 9.6749523655e-03f;
  p = p * f + 5.5510472506e-02f;
  p = p * f + 2.4022166431e-01f;
  p = p * f + 6.9314658642e-01f;
  p = p * f + 1.0f;
#if DMCLIP_AVX512
  return (vf)_mm512_scalef_ps((__m512)p, (__m512)k);
#else
  vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}
inline Vec<double> vexp2(Vec<double> x) {
  for (int k = 0; k < W; ++k) x[k] = std::exp2(x[k]);
  return x;
}
template <typename T>
constexpr T log2e() { return T(1.44269504088896340736); }
// exp(x) = 2^(x log2 e): about |x| 1e-7 relative (the rounding of x log2 e), enough for softplus and silu
DMCLIP_INLINE vf vexp(vf x) { return vexp2(x * kLog2e); }

// 1 / x for x in [2^-23, 2]: the hardware estimate and one Newton step (about 1 ulp with AVX-512's 14-bit
// estimate, 2 with AVX2's 12-bit one) instead of a division, whose throughput is several times lower
DMCLIP_INLINE vf vrcp(vf x) {
#if DMCLIP_AVX512
  const vf r = (vf)_mm512_rcp14_ps((__m512)x);
#elif DMCLIP_AVX2
  const vf r = (vf)_mm256_rcp_ps((__m256)x);
#else
  return 1.0f / x;
#endif
#if DMCLIP_AVX2
  return r + r * (1.0f - x * r);
#endif
}
DMCLIP_INLINE vf vlog1p01(vf e) {  // log(1 + e) for e in [0, 1]: Cephes logf on w = 1 + e, Goldberg's correction
  const vf w = 1.0f + e;
  vi bits;
  std::memcpy(&bits, &w, sizeof(bits));
  const vf exponent = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  vf m;
  std::memcpy(&m, &bits, sizeof(m));
  const auto small = m < 0.707106781186547524f;
  const vf ex = small ? exponent - 1.0f : exponent;
  const vf x = small ? m + m - 1.0f : m - 1.0f;
  const vf zz = x * x;
  vf y = vsplat(7.0376836292e-2f);
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * zz;
  y += -2.12194440e-4f * ex;
  y += -0.5f * zz;
  const vf logw = x + y + 0.693359375f * ex;
  const vf wm1 = w - 1.0f;
  const vf safe = wm1 == 0.0f ? vsplat(1.0f) : wm1;
  return wm1 == 0.0f ? e : logw * (e * vrcp(safe));
}

// softplus with torch's threshold 20: max(v, 0) + log1p(exp(-|v|)), the identity above 20
DMCLIP_INLINE vf vsoftplus(vf v) {
  const vf a = v < 0.0f ? -v : v;
  const vf sp = (v > 0.0f ? v : vsplat(0.0f)) + vlog1p01(vexp(-a));
  return v > 20.0f ? v : sp;
}
inline Vec<double> vsoftplus(Vec<double> v) {
  for (int k = 0; k < W; ++k) v[k] = v[k] > 20.0 ? v[k] : std::log1p(std::exp(v[k]));
  return v;
}
// sigmoid from exp(-|x|) in (0, 1]: the reciprocal's argument stays in [1, 2]
DMCLIP_INLINE vf vsigmoid(vf x) {
  const vf e = vexp(x < 0.0f ? x : -x);
  const vf s = vrcp(1.0f + e);
  return x < 0.0f ? e * s : s;
}
inline Vec<double> vsigmoid(Vec<double> x) { return 1.0 / (1.0 + vexp(-x)); }
// softplus(v) and its derivative (sigmoid(v); 1 above the threshold, as torch's) from one exp(-|v|)
DMCLIP_INLINE vf vsoftplus_grad(vf v, vf* slope) {
  const vf a = v < 0.0f ? -v : v;
  const vf e = vexp(-a);
  const vf sig = (v < 0.0f ? e : vsplat(1.0f)) * vrcp(1.0f + e);
  *slope = v > 20.0f ? vsplat(1.0f) : sig;
  return v > 20.0f ? v : (v > 0.0f ? v : vsplat(0.0f)) + vlog1p01(e);
}
inline Vec<double> vsoftplus_grad(Vec<double> v, Vec<double>* slope) {
  *slope = v > 20.0 ? 1.0 + vzero<double>() : vsigmoid(v);
  return vsoftplus(v);
}

// In-register transpose of W x W floats: v[i][j] -> v[j][i]. With AVX-512 16 x 16 in 64 shuffles (pairs of floats,
// pairs of pairs, then 128-bit quarters twice), with AVX2 8 x 8 in 24.
#if DMCLIP_AVX512
DMCLIP_INLINE void transpose(vf* v) {
  __m512 t[16], s[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps((__m512)v[i], (__m512)v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps((__m512)v[i], (__m512)v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // s[i + j], quarter k: column 4k + j of rows i .. i + 3
    s[i] = (__m512)_mm512_unpacklo_pd((__m512d)t[i], (__m512d)t[i + 2]);
    s[i + 1] = (__m512)_mm512_unpackhi_pd((__m512d)t[i], (__m512d)t[i + 2]);
    s[i + 2] = (__m512)_mm512_unpacklo_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
    s[i + 3] = (__m512)_mm512_unpackhi_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(s[j], s[4 + j], 0x88);       // quarters 0, 2 of rows 0-3 and 4-7
    t[4 + j] = _mm512_shuffle_f32x4(s[j], s[4 + j], 0xdd);   // quarters 1, 3
    t[8 + j] = _mm512_shuffle_f32x4(s[8 + j], s[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(s[8 + j], s[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = (vf)_mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    v[8 + j] = (vf)_mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    v[4 + j] = (vf)_mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    v[12 + j] = (vf)_mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
  }
}
DMCLIP_INLINE vf vload_first(const float* p, int n) { return (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
DMCLIP_INLINE void vstore_first(float* p, vf v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v); }
#elif DMCLIP_AVX2
DMCLIP_INLINE void transpose(vf* v) {
  __m256 t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps((__m256)v[i], (__m256)v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps((__m256)v[i], (__m256)v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // s[i + j], half k: column 4k + j of rows i .. i + 3
    s[i] = (__m256)_mm256_unpacklo_pd((__m256d)t[i], (__m256d)t[i + 2]);
    s[i + 1] = (__m256)_mm256_unpackhi_pd((__m256d)t[i], (__m256d)t[i + 2]);
    s[i + 2] = (__m256)_mm256_unpacklo_pd((__m256d)t[i + 1], (__m256d)t[i + 3]);
    s[i + 3] = (__m256)_mm256_unpackhi_pd((__m256d)t[i + 1], (__m256d)t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = (vf)_mm256_permute2f128_ps(s[j], s[4 + j], 0x20);
    v[4 + j] = (vf)_mm256_permute2f128_ps(s[j], s[4 + j], 0x31);
  }
}
DMCLIP_INLINE __m256i first_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
DMCLIP_INLINE vf vload_first(const float* p, int n) { return (vf)_mm256_maskload_ps(p, first_mask(n)); }
DMCLIP_INLINE void vstore_first(float* p, vf v, int n) { _mm256_maskstore_ps(p, first_mask(n), (__m256)v); }
#endif

// (rows of L values, row stride `stride`) <-> (L, W) lanes; lanes >= n are zero. With AVX2/AVX-512 a W x W
// block at a time through `transpose` (masked loads and stores for the last steps), which took the scalar
// element-by-element copies' place: they were about a quarter of the generic scan's forward.
template <typename T>
inline void gather_rows(const T* src, int64_t stride, int n, int64_t L, Vec<T>* dst) {
#if DMCLIP_AVX2
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t t0 = 0; t0 < L; t0 += W) {
      const int steps = static_cast<int>(imin(W, L - t0));
      vf v[W];
      for (int l = 0; l < W; ++l)
        v[l] = l >= n ? vzero<T>() : steps == W ? vload(src + l * stride + t0, W) : vload_first(src + l * stride + t0, steps);
      transpose(v);
      for (int j = 0; j < steps; ++j) dst[t0 + j] = v[j];
    }
    return;
  }
#endif
  for (int64_t t = 0; t < L; ++t) dst[t] = vzero<T>();
  for (int l = 0; l < n; ++l)
    for (int64_t t = 0; t < L; ++t) dst[t][l] = src[l * stride + t];
}
template <typename T>
inline void scatter_rows(const Vec<T>* src, int64_t stride, int n, int64_t L, T* dst) {
#if DMCLIP_AVX2
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t t0 = 0; t0 < L; t0 += W) {
      const int steps = static_cast<int>(imin(W, L - t0));
      vf v[W];
      for (int j = 0; j < W; ++j) v[j] = j < steps ? src[t0 + j] : vzero<T>();
      transpose(v);
      for (int l = 0; l < n; ++l) {
        if (steps == W) vstore(dst + l * stride + t0, v[l], W);
        else vstore_first(dst + l * stride + t0, v[l], steps);
      }
    }
    return;
  }
#endif
  for (int l = 0; l < n; ++l)
    for (int64_t t = 0; t < L; ++t) dst[l * stride + t] = src[t][l];
}

// ======================================================================== the generic selective scan
// One item = batch row b, channels c0 .. c0 + W - 1 of (batch, dim, L) tensors; B, C stay (batch, N, L).

// work (in elements of T) one thread needs for one item; Vec-aligned slices
inline int64_t scan_work_size(int64_t L, int64_t N) { return (11 * L + 2 * (L + 1) * N + 2 * L * N) * W; }

// One step of the state recurrence for every n (x_t = 2^(dt A2) x_{t-1} + dt u B_t); returns <C_t, x_t>.
// States go from xprev to xt (the same array in the forward); the decays are stored into `at` when
// kStoreDecays (the backward's recompute). Inlined, so that with a fixed N the forward's states stay in registers.
template <typename T, int NS, bool kStoreDecays>
DMCLIP_INLINE Vec<T> state_step(int64_t N, const Vec<T>* A2, Vec<T> dt, Vec<T> dtu, const T* Bp, const T* Cp,
                                int64_t stride, const Vec<T>* xprev, Vec<T>* xt, Vec<T>* at) {
  Vec<T> y0 = vzero<T>(), y1 = vzero<T>();  // two sums: half the dependency chain
  int64_t n = 0;
#pragma GCC unroll 8
  for (; n + 1 < N; n += 2) {  // unrolled for a fixed N: the states can stay in registers
    const Vec<T> a0 = vexp2(dt * A2[n]), a1 = vexp2(dt * A2[n + 1]);
    if constexpr (kStoreDecays) { at[n] = a0; at[n + 1] = a1; }
    xt[n] = a0 * xprev[n] + dtu * Bp[n * stride];
    xt[n + 1] = a1 * xprev[n + 1] + dtu * Bp[(n + 1) * stride];
    y0 += xt[n] * Cp[n * stride];
    y1 += xt[n + 1] * Cp[(n + 1) * stride];
  }
  if (n < N) {
    const Vec<T> a0 = vexp2(dt * A2[n]);
    if constexpr (kStoreDecays) at[n] = a0;
    xt[n] = a0 * xprev[n] + dtu * Bp[n * stride];
    y0 += xt[n] * Cp[n * stride];
  }
  return y0 + y1;
}

// The adjoint sweep h_t = dy_t C_t + a_{t+1} h_{t+1} of one direction, for the states n0 .. n0 + count - 1
// (count = NC when NC > 0, else < 8), steps s = L - 1 down to 0 at time t = reverse ? L - 1 - s : s. The h and
// dA sums of these at most 8 states stay in registers for the whole sweep; what each step needs summed over
// all n (d dt through A, and <h, B>) is added into DDT[t] and HB[t], dB and dC into the lane accumulators.
template <typename T>
struct Sweep {
  const Vec<T>* DY; const Vec<T>* DT; const Vec<T>* DTU;  // by t
  const T* B; const T* C; int64_t t_stride, n_stride;      // B_t[n] = B[t t_stride + n n_stride]
  const Vec<T>* XS; const Vec<T>* AS;                      // by s: XS[(s + 1) N + n] = x after step s
  Vec<T>* dBa; Vec<T>* dCa; Vec<T>* DDT; Vec<T>* HB;       // by t
  int64_t L, N;
  bool reverse;
};

template <typename T, int NC>
inline void sweep_states(const Sweep<T>& w, int64_t n0, int64_t count, const Vec<T>* Av, Vec<T>* h, Vec<T>* dA) {
  const int64_t M = NC > 0 ? NC : count, N = w.N, L = w.L, ns = w.n_stride;
  Vec<T> hr[8], dr[8], ar[8];
  for (int64_t j = 0; j < M; ++j) { hr[j] = h[n0 + j]; dr[j] = dA[n0 + j]; ar[j] = Av[n0 + j]; }
  for (int64_t s = L - 1; s >= 0; --s) {
    const int64_t t = w.reverse ? L - 1 - s : s;
    const Vec<T> dy = w.DY[t], dt = w.DT[t], dtu = w.DTU[t];
    const T* Bp = w.B + t * w.t_stride + n0 * ns;
    const T* Cp = w.C + t * w.t_stride + n0 * ns;
    const Vec<T>* xprev = w.XS + s * N + n0;
    const Vec<T>* xt = xprev + N;
    const Vec<T>* at = w.AS + s * N + n0;
    Vec<T>* dBt = w.dBa + t * N + n0;
    Vec<T>* dCt = w.dCa + t * N + n0;
    Vec<T> ddt0 = vzero<T>(), ddt1 = vzero<T>(), hB0 = vzero<T>(), hB1 = vzero<T>();
#pragma GCC unroll 8
    for (int64_t j = 0; j < M; ++j) {
      const Vec<T> hv = hr[j] + dy * Cp[j * ns];
      dCt[j] += dy * xt[j];
      hr[j] = hv * at[j];                    // carried to step t - 1
      const Vec<T> dlog = hr[j] * xprev[j];  // dLoss / d(dt A_n)
      dr[j] += dlog * dt;
      dBt[j] += hv * dtu;
      if (j & 1) { ddt1 += dlog * ar[j]; hB1 += hv * Bp[j * ns]; }
      else { ddt0 += dlog * ar[j]; hB0 += hv * Bp[j * ns]; }
    }
    w.DDT[t] += ddt0 + ddt1;
    w.HB[t] += hB0 + hB1;
  }
  for (int64_t j = 0; j < M; ++j) { h[n0 + j] = hr[j]; dA[n0 + j] = dr[j]; }
}

// every state of one direction, in chunks of 8
template <typename T>
inline void sweep(const Sweep<T>& w, const Vec<T>* Av, Vec<T>* h, Vec<T>* dA) {
  for (int64_t t = 0; t < w.L; ++t) { w.DDT[t] = vzero<T>(); w.HB[t] = vzero<T>(); }
  int64_t n0 = 0;
  for (; n0 + 8 <= w.N; n0 += 8) sweep_states<T, 8>(w, n0, 8, Av, h, dA);
  if (n0 < w.N) sweep_states<T, 0>(w, n0, w.N - n0, Av, h, dA);
}

// The per-step scalars (softplus, silu) are computed for the whole row in a prepass before the recurrence:
// they do not depend on the states, so the recurrence then runs at the throughput of its exps instead of
// waiting, step after step, on the latency of a softplus.
template <typename T, int NS>
void scan_forward_item_n(const ScanArgs<T>& p, int64_t b, int64_t c0, T* work, T* out, T* last) {
  const int64_t L = p.L, N = NS > 0 ? NS : p.N, dim = p.dim;
  const int nc = static_cast<int>(imin(W, dim - c0));
  const int64_t row = (b * dim + c0) * L;
  Vec<T>* U = reinterpret_cast<Vec<T>*>(work);  // u, then D u, then the output
  Vec<T>* V = U + L;                              // delta, then dt
  Vec<T>* Z = V + L;                              // z, then silu(z)
  Vec<T>* DTU = Z + L;
  gather_rows(p.u + row, L, nc, L, U);
  gather_rows(p.delta + row, L, nc, L, V);
  if (p.z) gather_rows(p.z + row, L, nc, L, Z);
  Vec<T> A2[NS > 0 ? NS : kMaxN], x[NS > 0 ? NS : kMaxN];  // A2 = A log2 e: decays are 2^(dt A2)
  for (int64_t n = 0; n < N; ++n) {
    A2[n] = vzero<T>();
    for (int l = 0; l < nc; ++l) A2[n][l] = p.A[(c0 + l) * N + n];
    A2[n] *= log2e<T>();
    x[n] = vzero<T>();
  }
  const Vec<T> bias = p.delta_bias ? vload(p.delta_bias + c0, nc) : vzero<T>();
  const Vec<T> Dv = p.D ? vload(p.D + c0, nc) : vzero<T>();
  for (int64_t t = 0; t < L; ++t) {
    const Vec<T> v = V[t] + bias;
    V[t] = p.softplus ? vsoftplus(v) : v;
    DTU[t] = V[t] * U[t];
    U[t] = Dv * U[t];
    if (p.z) Z[t] = Z[t] * vsigmoid(Z[t]);
  }
  const T* Bb = p.B + b * N * L;
  const T* Cb = p.C + b * N * L;
  for (int64_t t = 0; t < L; ++t) {
    const Vec<T> y = U[t] + state_step<T, NS, false>(N, A2, V[t], DTU[t], Bb + t, Cb + t, L, x, x, nullptr);
    U[t] = p.z ? y * Z[t] : y;
  }
  scatter_rows(U, L, nc, L, out + row);
  if (last)
    for (int l = 0; l < nc; ++l)
      for (int64_t n = 0; n < N; ++n) last[(b * dim + c0 + l) * N + n] = x[n][l];
}

template <typename T>
void scan_forward_item(const ScanArgs<T>& p, int64_t b, int64_t c0, T* work, T* out, T* last) {
  switch (p.N) {
    case 16: return scan_forward_item_n<T, 16>(p, b, c0, work, out, last);
    case 8: return scan_forward_item_n<T, 8>(p, b, c0, work, out, last);
    default: return scan_forward_item_n<T, 0>(p, b, c0, work, out, last);
  }
}

// Backward of one item: recompute states x_t and decays a_t into the work buffer, then sweep the adjoint
// recurrence h_t = dy_t C_t + a_{t+1} h_{t+1} backwards. dB, dC (sums over channels) accumulate lane-wise
// into dBC (2 L N vectors, flushed by scan_flush_BC); dA, dD, d delta_bias are added into the task's rows.
template <typename T, int NS>
void scan_backward_item_n(const ScanArgs<T>& p, int64_t b, int64_t c0, T* work, const T* dout, const T* dlast,
                          const ScanGrads<T>& g, T* dBC, T* dA, T* dD, T* dbias) {
  const int64_t L = p.L, N = NS > 0 ? NS : p.N, dim = p.dim;
  const int nc = static_cast<int>(imin(W, dim - c0));
  const int64_t row = (b * dim + c0) * L;
  Vec<T>* U = reinterpret_cast<Vec<T>*>(work);
  Vec<T>* V = U + L;       // delta, then d dt / d(delta + bias)
  Vec<T>* Z = V + L;       // z, then silu(z)
  Vec<T>* GD = Z + L;      // silu'(z)
  Vec<T>* G = GD + L;      // dout, then d delta
  Vec<T>* DT = G + L;
  Vec<T>* DTU = DT + L;
  Vec<T>* Y = DTU + L;     // <C, x> + D u before the gate, then dLoss/dy
  Vec<T>* DU = Y + L;      // <h, B>, then du
  Vec<T>* DZ = DU + L;
  Vec<T>* DDT = DZ + L;
  Vec<T>* XS = DDT + L;    // XS[(t + 1) N + n] = x_t, XS[n] = x_{-1} = 0
  Vec<T>* AS = XS + (L + 1) * N;  // AS[t N + n] = exp(dt_t A_n)
  Vec<T>* dBa = reinterpret_cast<Vec<T>*>(dBC);
  Vec<T>* dCa = dBa + L * N;
  gather_rows(p.u + row, L, nc, L, U);
  gather_rows(p.delta + row, L, nc, L, V);
  if (p.z) gather_rows(p.z + row, L, nc, L, Z);
  gather_rows(dout + row, L, nc, L, G);
  Vec<T> Av[NS > 0 ? NS : kMaxN], A2[NS > 0 ? NS : kMaxN], h[NS > 0 ? NS : kMaxN], dAacc[NS > 0 ? NS : kMaxN];
  for (int64_t n = 0; n < N; ++n) {
    Av[n] = vzero<T>();
    h[n] = vzero<T>();
    for (int l = 0; l < nc; ++l) {
      Av[n][l] = p.A[(c0 + l) * N + n];
      if (dlast) h[n][l] = dlast[(b * dim + c0 + l) * N + n];
    }
    A2[n] = Av[n] * log2e<T>();
    dAacc[n] = vzero<T>();
    XS[n] = vzero<T>();
  }
  const Vec<T> bias = p.delta_bias ? vload(p.delta_bias + c0, nc) : vzero<T>();
  const Vec<T> Dv = p.D ? vload(p.D + c0, nc) : vzero<T>();
  const T* Bb = p.B + b * N * L;
  const T* Cb = p.C + b * N * L;
  // 1) the per-step scalars, then the states and decays
  for (int64_t t = 0; t < L; ++t) {
    const Vec<T> v = V[t] + bias;
    Vec<T> slope = vzero<T>() + T(1);
    DT[t] = p.softplus ? vsoftplus_grad(v, &slope) : v;
    V[t] = slope;
    DTU[t] = DT[t] * U[t];
    if (p.z) {
      const Vec<T> zv = Z[t], s = vsigmoid(zv);
      Z[t] = zv * s;
      GD[t] = s * (T(1) + zv * (T(1) - s));
    }
  }
  for (int64_t t = 0; t < L; ++t)
    Y[t] = Dv * U[t] + state_step<T, NS, true>(N, A2, DT[t], DTU[t], Bb + t, Cb + t, L, XS + t * N, XS + (t + 1) * N,
                                         AS + t * N);
  // 2) the gate, then the adjoint sweep; h holds dLoss/dx_t (times a_{t+1} once step t is done)
  for (int64_t t = 0; t < L; ++t) {
    if (p.z) {
      DZ[t] = G[t] * Y[t] * GD[t];
      Y[t] = G[t] * Z[t];
    } else {
      Y[t] = G[t];
    }
  }
  const Sweep<T> w{Y, DT, DTU, Bb, Cb, 1, L, XS, AS, dBa, dCa, DDT, DU, L, N, false};
  sweep(w, Av, h, dAacc);
  Vec<T> dDacc = vzero<T>(), dbacc = vzero<T>();
  for (int64_t t = 0; t < L; ++t) {
    const Vec<T> dy = Y[t], hB = DU[t];
    dDacc += dy * U[t];
    DU[t] = dy * Dv + hB * DT[t];
    G[t] = (DDT[t] + hB * U[t]) * V[t];  // d delta
    dbacc += G[t];
  }
  scatter_rows(DU, L, nc, L, g.du + row);
  scatter_rows(G, L, nc, L, g.ddelta + row);
  if (p.z) scatter_rows(DZ, L, nc, L, g.dz + row);
  for (int l = 0; l < nc; ++l) {
    for (int64_t n = 0; n < N; ++n) dA[(c0 + l) * N + n] += dAacc[n][l];
    dD[c0 + l] += dDacc[l];
    dbias[c0 + l] += dbacc[l];
  }
}

template <typename T>
void scan_backward_item(const ScanArgs<T>& p, int64_t b, int64_t c0, T* work, const T* dout, const T* dlast,
                        const ScanGrads<T>& g, T* dBC, T* dA, T* dD, T* dbias) {
  switch (p.N) {
    case 16: return scan_backward_item_n<T, 16>(p, b, c0, work, dout, dlast, g, dBC, dA, dD, dbias);
    case 8: return scan_backward_item_n<T, 8>(p, b, c0, work, dout, dlast, g, dBC, dA, dD, dbias);
    default: return scan_backward_item_n<T, 0>(p, b, c0, work, dout, dlast, g, dBC, dA, dD, dbias);
  }
}

// lanes of the dB, dC accumulators -> one sum per (n, t) added into dB, dC rows (N, L); accumulators zeroed
template <typename T>
void scan_flush_BC(int64_t L, int64_t N, T* dBC, T* dB, T* dC) {
  Vec<T>* dBa = reinterpret_cast<Vec<T>*>(dBC);
  Vec<T>* dCa = dBa + L * N;
  for (int64_t t = 0; t < L; ++t)
    for (int64_t n = 0; n < N; ++n) {
      dB[n * L + t] += vsum<T>(dBa[t * N + n]);
      dC[n * L + t] += vsum<T>(dCa[t * N + n]);
      dBa[t * N + n] = vzero<T>();
      dCa[t * N + n] = vzero<T>();
    }
}

// ================================================================ Vim's bidirectional mixer (channels-last)
// Item = (batch row b, channels c0 .. c0 + W - 1) of (batch, L, E) tensors; see selective_scan.cpp.

// depthwise conv1d + silu of one (direction r, batch row b, channel block): x (row stride 2E) -> xc. KS > 0:
// the kernel size at compile time (the taps unrolled); steps whose taps all fall inside the sequence run
// without bounds checks.
template <typename T, int KS>
void conv_forward_item_k(const MixArgs<T>& a, int64_t r, int64_t b, int64_t c0, T* xc) {
  const int64_t L = a.L, E = a.E, K = KS > 0 ? KS : a.K;
  const int nc = static_cast<int>(imin(W, E - c0));
  Vec<T> wv[KS > 0 ? KS : kMaxK];
  for (int64_t k = 0; k < K; ++k) {
    wv[k] = vzero<T>();
    for (int l = 0; l < nc; ++l) wv[k][l] = a.conv_w[(r * E + c0 + l) * K + k];
  }
  const Vec<T> bias = vload(a.conv_b + r * E + c0, nc);
  const T* x = a.xz + b * L * 2 * E + c0;
  T* o = xc + (r * a.batch + b) * L * E + c0;
  // tap k reads step t + sign k + shift: forward (r = 0) t + k - (K - 1), backward (r = 1) t + (K - 1) - k
  const int64_t sign = r == 0 ? 1 : -1, shift = r == 0 ? -(K - 1) : K - 1;
  const int64_t lo = r == 0 ? K - 1 : 0, hi = r == 0 ? L : L - (K - 1);  // steps with every tap inside
  auto edge = [&](int64_t t) {
    Vec<T> acc = bias;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t s = t + sign * k + shift;
      if (s >= 0 && s < L) acc += wv[k] * vload(x + s * 2 * E, nc);
    }
    vstore(o + t * E, acc * vsigmoid(acc), nc);
  };
  for (int64_t t = 0; t < imin(lo, L); ++t) edge(t);
  if (nc == W) {
    for (int64_t t = lo; t < hi; ++t) {
      const T* xt = x + (t + shift) * 2 * E;
      Vec<T> acc = bias;
#pragma GCC unroll 8
      for (int64_t k = 0; k < K; ++k) {
        Vec<T> v;
        std::memcpy(&v, xt + sign * k * 2 * E, sizeof(v));
        acc += wv[k] * v;
      }
      acc *= vsigmoid(acc);
      std::memcpy(o + t * E, &acc, sizeof(acc));
    }
  } else {
    for (int64_t t = lo; t < hi; ++t) edge(t);
  }
  for (int64_t t = std::max(hi, lo); t < L; ++t) edge(t);
}

template <typename T>
void conv_forward_item(const MixArgs<T>& a, int64_t r, int64_t b, int64_t c0, T* xc) {
  if (a.K == 4) return conv_forward_item_k<T, 4>(a, r, b, c0, xc);
  return conv_forward_item_k<T, 0>(a, r, b, c0, xc);
}

// work (elements of T) of conv_backward_blocks for `blocks` channel blocks: both directions' gradients before
// the SiLU, padded by K - 1 steps, then per block the weights and the dw, db accumulators (2 (2 K + 1) vectors)
inline int64_t conv_backward_work_size(int64_t L, int64_t K, int64_t blocks) {
  return (2 * (L + K - 1) + blocks * 2 * (2 * K + 1)) * W;
}

// gradient of conv_forward for channel blocks [blk0, blk1) (W channels each) over every batch row: dxc -> dx
// (batch, L, row stride dx_stride) columns, dw (2, E, K), db (2, E) rows of these channels (blocks split over
// threads: no reduction). Row after row, each row's blocks in turn: neighbouring blocks read neighbouring cache
// lines of the same rows of x, dxc and dx (block after block over all rows, each block found its lines
// evicted; a perf profile had this loop's x loads at a third of the mixer backward). Per block and row, each
// direction's gradient before the SiLU goes to the padded buffer, so that dx is gathered from it: each dx step
// written once, no zeroing pass and no read-modify-write per tap; the x steps loaded for the recomputed
// pre-activation serve the weight gradient too.
template <typename T>
void conv_backward_blocks(const MixArgs<T>& a, int64_t blk0, int64_t blk1, const T* dxc, T* dx, int64_t dx_stride,
                          T* dw, T* db, T* work) {
  const int64_t L = a.L, E = a.E, K = a.K;
  Vec<T>* GP[2] = {reinterpret_cast<Vec<T>*>(work), reinterpret_cast<Vec<T>*>(work) + L + K - 1};
  Vec<T>* blocks = GP[1] + L + K - 1;  // per block: wv[2][K], dwv[2][K], dbv[2]
  const int64_t per_block = 2 * (2 * K + 1);
  // GP[0][t]: step t of the causal direction, zeros at t = L .. L + K - 2; GP[1][K - 1 + t]: the anti-causal
  // one, zeros before
  for (int64_t k = 0; k < K - 1; ++k) { GP[0][L + k] = vzero<T>(); GP[1][k] = vzero<T>(); }
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t c0 = blk * W;
    const int nc = static_cast<int>(imin(W, E - c0));
    Vec<T>* wv = blocks + (blk - blk0) * per_block;
    for (int64_t rk = 0; rk < 2 * K; ++rk) {
      wv[rk] = vzero<T>();
      for (int l = 0; l < nc; ++l) wv[rk][l] = a.conv_w[((rk / K) * E + c0 + l) * K + rk % K];
      wv[2 * K + rk] = vzero<T>();
    }
    wv[4 * K] = wv[4 * K + 1] = vzero<T>();
  }
  for (int64_t b = 0; b < a.batch; ++b) {
    const T* x = a.xz + b * L * 2 * E;
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t c0 = blk * W;
      const int nc = static_cast<int>(imin(W, E - c0));
      Vec<T>* wv = blocks + (blk - blk0) * per_block;
      Vec<T>* dwv = wv + 2 * K;
      Vec<T>* dbv = dwv + 2 * K;
      for (int64_t r = 0; r < 2; ++r) {
        const Vec<T> bias = vload(a.conv_b + r * E + c0, nc);
        const T* g = dxc + (r * a.batch + b) * L * E + c0;
        Vec<T>* gp_out = GP[r] + (r == 0 ? 0 : K - 1);
        const Vec<T>* w = wv + r * K;
        Vec<T> dwr[kMaxK], dbr = dbv[r];
        for (int64_t k = 0; k < K; ++k) dwr[k] = dwv[r * K + k];
        for (int64_t t = 0; t < L; ++t) {
          Vec<T> xs[kMaxK];
          Vec<T> pre = bias;
          for (int64_t k = 0; k < K; ++k) {  // tap k reads step s (causal t + k - (K - 1), anti-causal t + (K - 1) - k)
            const int64_t s = r == 0 ? t + k - (K - 1) : t + (K - 1) - k;
            xs[k] = s >= 0 && s < L ? vload(x + s * 2 * E + c0, nc) : vzero<T>();
            pre += w[k] * xs[k];
          }
          const Vec<T> sg = vsigmoid(pre);
          const Vec<T> gp = vload(g + t * E, nc) * sg * (T(1) + pre * (T(1) - sg));
          dbr += gp;
          for (int64_t k = 0; k < K; ++k) dwr[k] += gp * xs[k];
          gp_out[t] = gp;
        }
        for (int64_t k = 0; k < K; ++k) dwv[r * K + k] = dwr[k];
        dbv[r] = dbr;
      }
      // step s feeds the causal output t = s + (K - 1) - k and the anti-causal one t = s - (K - 1) + k by tap k
      T* dxb = dx + b * L * dx_stride + c0;
      for (int64_t s = 0; s < L; ++s) {
        Vec<T> acc = vzero<T>();
        for (int64_t k = 0; k < K; ++k) acc += GP[0][s + (K - 1) - k] * wv[k] + GP[1][s + k] * wv[K + k];
        vstore(dxb + s * dx_stride, acc, nc);
      }
    }
  }
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t c0 = blk * W;
    const int nc = static_cast<int>(imin(W, E - c0));
    const Vec<T>* dwv = blocks + (blk - blk0) * per_block + 2 * K;
    for (int64_t r = 0; r < 2; ++r)
      for (int l = 0; l < nc; ++l) {
        for (int64_t k = 0; k < K; ++k) dw[(r * E + c0 + l) * K + k] = dwv[r * K + k][l];
        db[r * E + c0 + l] = dwv[2 * K + r][l];
      }
  }
}

// A = -exp(A_log) of direction r for these channels, and A2 = A log2 e (the decays are 2^(dt A2))
template <typename T>
inline void load_A(const MixArgs<T>& a, int64_t r, int64_t c0, int nc, int64_t N, Vec<T>* Av, Vec<T>* A2) {
  for (int64_t n = 0; n < N; ++n) {
    Av[n] = vzero<T>();
    for (int l = 0; l < nc; ++l) Av[n][l] = a.A_log[(r * a.E + c0 + l) * N + n];
    Av[n] = -vexp(Av[n]);
    A2[n] = Av[n] * log2e<T>();
  }
}

// dt_proj's columns for these channels, one vector per k: delta_t = sum_k dt_low[t, k] wdt[k]
template <typename T>
inline void load_dtproj(const MixArgs<T>& a, int64_t r, int64_t c0, int nc, Vec<T>* wdt) {
  for (int64_t k = 0; k < a.R; ++k) {
    wdt[k] = vzero<T>();
    for (int l = 0; l < nc; ++l) wdt[k][l] = a.dtproj_w[(r * a.E + c0 + l) * a.R + k];
  }
}

// work (elements of T) of the mixer forward: dt, dt u, D u and the gate, L each
inline int64_t mixer_forward_work_size(int64_t L) { return 4 * L * W; }

// both directions of one item; writes out = silu(z) * (y_0 + y_1) / 2. Per-step scalars in a prepass, as
// in the generic scan.
template <typename T, int NS>
void mixer_forward_item_n(const MixArgs<T>& a, int64_t b, int64_t c0, T* out, T* work) {
  const int64_t L = a.L, E = a.E, N = NS > 0 ? NS : a.N, R = a.R, P = a.P();
  const int nc = static_cast<int>(imin(W, E - c0));
  Vec<T>* DT = reinterpret_cast<Vec<T>*>(work);
  Vec<T>* DTU = DT + L;
  Vec<T>* SK = DTU + L;  // the D u skip
  Vec<T>* G = SK + L;    // silu(z) / 2
  constexpr int64_t ahead = 8;  // rows are E apart: each step touches a new cache line, so fetch ahead
  for (int64_t t = 0; t < L; ++t) {
    if (t + ahead < L) __builtin_prefetch(a.xz + (b * L + t + ahead) * 2 * E + E + c0);
    const Vec<T> z = vload(a.xz + (b * L + t) * 2 * E + E + c0, nc);
    G[t] = z * vsigmoid(z) * T(0.5);
  }
  Vec<T> Av[NS > 0 ? NS : kMaxN], A2[NS > 0 ? NS : kMaxN], x[NS > 0 ? NS : kMaxN], wdt[kMaxR];
  for (int64_t r = 0; r < 2; ++r) {
    load_A(a, r, c0, nc, N, Av, A2);
    const Vec<T> Dv = a.D ? vload(a.D + r * E + c0, nc) : vzero<T>();
    const Vec<T> bias = vload(a.dt_bias + r * E + c0, nc);
    for (int64_t n = 0; n < N; ++n) x[n] = vzero<T>();
    load_dtproj(a, r, c0, nc, wdt);
    const T* u = a.xc + (r * a.batch + b) * L * E + c0;
    const T* xd = a.xdbl + (r * a.batch + b) * L * P;
    for (int64_t t = 0; t < L; ++t) {
      if (t + ahead < L) __builtin_prefetch(u + (t + ahead) * E);
      const Vec<T> uv = vload(u + t * E, nc);
      const T* low = xd + t * P;
      Vec<T> v = bias;
      for (int64_t k = 0; k < R; ++k) v += wdt[k] * low[k];
      DT[t] = vsoftplus(v);
      DTU[t] = DT[t] * uv;
      SK[t] = Dv * uv;
    }
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = r == 0 ? s : L - 1 - s;
      const T* Bp = xd + t * P + R;
      const Vec<T> y = SK[t] + state_step<T, NS, false>(N, A2, DT[t], DTU[t], Bp, Bp + N, 1, x, x, nullptr);
      T* o = out + (b * L + t) * E + c0;
      if (r == 0) vstore(o, y, nc);
      else vstore(o, (vload(o, nc) + y) * G[t], nc);
    }
  }
}

template <typename T>
void mixer_forward_item(const MixArgs<T>& a, int64_t b, int64_t c0, T* out, T* work) {
  switch (a.N) {
    case 16: return mixer_forward_item_n<T, 16>(a, b, c0, out, work);
    case 8: return mixer_forward_item_n<T, 8>(a, b, c0, out, work);
    default: return mixer_forward_item_n<T, 0>(a, b, c0, out, work);
  }
}

// delta = dt_low W^T: the gradients of both factors from DV[t] = dLoss / d delta_t, dW[k] (in registers for a
// fixed rank RS > 0: a runtime rank kept them in memory, a load and a store per step and k) and the lane-wise
// accumulators dLa[t R + k] of d dt_low
template <typename T, int RS>
inline void dtproj_grads_r(int64_t L, int64_t R, int64_t P, const T* low, const Vec<T>* DV, const Vec<T>* wdt,
                           Vec<T>* dW, Vec<T>* dLa) {
  const int64_t M = RS > 0 ? RS : R;
  Vec<T> acc[RS > 0 ? RS : kMaxR], w[RS > 0 ? RS : kMaxR];
  for (int64_t k = 0; k < M; ++k) { acc[k] = dW[k]; w[k] = wdt[k]; }
  for (int64_t t = 0; t < L; ++t) {
    const Vec<T> dv = DV[t];
    Vec<T>* dl = dLa + t * M;
#pragma GCC unroll 16
    for (int64_t k = 0; k < M; ++k) {
      acc[k] += dv * low[t * P + k];
      dl[k] += dv * w[k];
    }
  }
  for (int64_t k = 0; k < M; ++k) dW[k] = acc[k];
}
template <typename T>
inline void dtproj_grads(int64_t L, int64_t R, int64_t P, const T* low, const Vec<T>* DV, const Vec<T>* wdt,
                         Vec<T>* dW, Vec<T>* dLa) {
  switch (R) {  // Vim's dt_rank = ceil(width / 16): 4 for width 64, 12 for 192 (Vim-Ti), 24 for 384 (Vim-S)
    case 4: return dtproj_grads_r<T, 4>(L, R, P, low, DV, wdt, dW, dLa);
    case 12: return dtproj_grads_r<T, 12>(L, R, P, low, DV, wdt, dW, dLa);
    default: return dtproj_grads_r<T, 0>(L, R, P, low, DV, wdt, dW, dLa);
  }
}

// per-thread work of the mixer backward (elements of T): per direction states (L + 1) N, decays L N, the
// dB, dC accumulators 2 L N and the d dt_low accumulators L R, dt, dt u and softplus' L each; dy, the summed
// outputs, the sweep's sums L each
inline int64_t mixer_direction_size(int64_t L, int64_t N, int64_t R) { return (L + 1) * N + 3 * L * N + L * R + 3 * L; }
inline int64_t mixer_work_size(int64_t L, int64_t N, int64_t R) { return (2 * mixer_direction_size(L, N, R) + 4 * L) * W; }

// Backward of one item (both directions): recompute dt (dt_proj inside, as in the forward), states and
// decays, the gate, then each direction's adjoint sweep against its scan order. dB, dC and d dt_low (sums
// over channels) accumulate lane-wise in the work buffer across the items of a batch row (flushed by
// mixer_flush_BC); dA_log, dD, d dt_bias, d dt_proj are added into the task's rows. No delta tensor exists.
template <typename T, int NS>
void mixer_backward_item_n(const MixArgs<T>& a, int64_t b, int64_t c0, const T* dout, T* work,
                           const MixGrads<T>& g, T* dA_log, T* dD, T* dbias, T* dWdt) {
  const int64_t L = a.L, E = a.E, N = NS > 0 ? NS : a.N, R = a.R, P = a.P();
  const int nc = static_cast<int>(imin(W, E - c0));
  Vec<T>* base = reinterpret_cast<Vec<T>*>(work);
  Vec<T>* XS[2]; Vec<T>* AS[2]; Vec<T>* dBa[2]; Vec<T>* dCa[2]; Vec<T>* dLa[2]; Vec<T>* DT[2]; Vec<T>* DTU[2];
  Vec<T>* VS[2];  // softplus'
  for (int r = 0; r < 2; ++r) {
    XS[r] = base; base += (L + 1) * N;
    AS[r] = base; base += L * N;
    dBa[r] = base; base += L * N;
    dCa[r] = base; base += L * N;
    dLa[r] = base; base += L * R;
    DT[r] = base; base += L;
    DTU[r] = base; base += L;
    VS[r] = base; base += L;
  }
  Vec<T>* DY = base;
  Vec<T>* YS = DY + L;
  Vec<T>* DDT = YS + L;
  Vec<T>* HB = DDT + L;
  Vec<T> Av[NS > 0 ? NS : kMaxN], A2[NS > 0 ? NS : kMaxN], h[NS > 0 ? NS : kMaxN], dAacc[NS > 0 ? NS : kMaxN];
  Vec<T> wdt[kMaxR], dW[kMaxR];
  // 1) recompute both directions' dt, states, decays and outputs
  for (int64_t r = 0; r < 2; ++r) {
    load_A(a, r, c0, nc, N, Av, A2);
    load_dtproj(a, r, c0, nc, wdt);
    const Vec<T> Dv = a.D ? vload(a.D + r * E + c0, nc) : vzero<T>();
    const Vec<T> bias = vload(a.dt_bias + r * E + c0, nc);
    Vec<T>* xs = XS[r];
    Vec<T>* as = AS[r];
    for (int64_t n = 0; n < N; ++n) xs[n] = vzero<T>();
    const T* u = a.xc + (r * a.batch + b) * L * E + c0;
    const T* low = a.xdbl + (r * a.batch + b) * L * P;
    const T* xd = low + R;
    for (int64_t t = 0; t < L; ++t) {
      const Vec<T> uv = vload(u + t * E, nc);
      Vec<T> v = bias, slope;
      for (int64_t k = 0; k < R; ++k) v += wdt[k] * low[t * P + k];
      DT[r][t] = vsoftplus_grad(v, &slope);
      VS[r][t] = slope;
      DTU[r][t] = DT[r][t] * uv;
      YS[t] = r == 0 ? Dv * uv : YS[t] + Dv * uv;
    }
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = r == 0 ? s : L - 1 - s;
      const T* Bp = xd + t * P;
      YS[t] += state_step<T, NS, true>(N, A2, DT[r][t], DTU[r][t], Bp, Bp + N, 1, xs + s * N, xs + (s + 1) * N,
                                 as + s * N);
    }
  }
  // 2) the gate: out = silu(z) * (y0 + y1) / 2
  for (int64_t t = 0; t < L; ++t) {
    const Vec<T> z = vload(a.xz + (b * L + t) * 2 * E + E + c0, nc);
    const Vec<T> s = vsigmoid(z);
    const Vec<T> go = vload(dout + (b * L + t) * E + c0, nc) * T(0.5);
    vstore(g.dz + (b * L + t) * g.dz_stride + c0, go * YS[t] * s * (T(1) + z * (T(1) - s)), nc);
    DY[t] = go * z * s;
  }
  // 3) the adjoint recurrence of each direction, swept against its scan order
  for (int64_t r = 0; r < 2; ++r) {
    load_A(a, r, c0, nc, N, Av, A2);
    load_dtproj(a, r, c0, nc, wdt);
    const Vec<T> Dv = a.D ? vload(a.D + r * E + c0, nc) : vzero<T>();
    for (int64_t n = 0; n < N; ++n) { h[n] = vzero<T>(); dAacc[n] = vzero<T>(); }
    for (int64_t k = 0; k < R; ++k) dW[k] = vzero<T>();
    Vec<T> dDacc = vzero<T>(), dbacc = vzero<T>();
    const Vec<T>* xs = XS[r];
    const Vec<T>* as = AS[r];
    const T* u = a.xc + (r * a.batch + b) * L * E + c0;
    const T* low = a.xdbl + (r * a.batch + b) * L * P;
    const T* xd = low + R;
    T* du = g.dxc + (r * a.batch + b) * L * E + c0;
    const Sweep<T> w{DY, DT[r], DTU[r], xd, xd + N, P, 1, xs, as, dBa[r], dCa[r], DDT, HB, L, N, r == 1};
    sweep(w, Av, h, dAacc);
    for (int64_t t = 0; t < L; ++t) {
      const Vec<T> dy = DY[t], uv = vload(u + t * E, nc), hB = HB[t];
      vstore(du + t * E, dy * Dv + hB * DT[r][t], nc);
      const Vec<T> dv = (DDT[t] + hB * uv) * VS[r][t];  // dLoss / d delta
      dbacc += dv;
      dDacc += dy * uv;
      DDT[t] = dv;
    }
    dtproj_grads(L, R, P, low, DDT, wdt, dW, dLa[r]);
    for (int l = 0; l < nc; ++l)
      for (int64_t k = 0; k < R; ++k) dWdt[(r * E + c0 + l) * R + k] += dW[k][l];
    for (int l = 0; l < nc; ++l) {
      for (int64_t n = 0; n < N; ++n) dA_log[(r * E + c0 + l) * N + n] += dAacc[n][l] * Av[n][l];  // dA * A
      dD[r * E + c0 + l] += dDacc[l];
      dbias[r * E + c0 + l] += dbacc[l];
    }
  }
}

template <typename T>
void mixer_backward_item(const MixArgs<T>& a, int64_t b, int64_t c0, const T* dout, T* work, const MixGrads<T>& g,
                         T* dA_log, T* dD, T* dbias, T* dWdt) {
  switch (a.N) {
    case 16: return mixer_backward_item_n<T, 16>(a, b, c0, dout, work, g, dA_log, dD, dbias, dWdt);
    case 8: return mixer_backward_item_n<T, 8>(a, b, c0, dout, work, g, dA_log, dD, dbias, dWdt);
    default: return mixer_backward_item_n<T, 0>(a, b, c0, dout, work, g, dA_log, dD, dbias, dWdt);
  }
}

// dB, dC and d dt_low of one batch row, both directions: lanes -> one sum per (t, n) added into dest rows
// (L, P) = [dt_low | B | C]; the accumulators are zeroed for the next row
template <typename T>
void mixer_flush_BC(const MixArgs<T>& a, T* work, T* dest_r0, T* dest_r1) {
  const int64_t L = a.L, N = a.N, P = a.P(), R = a.R;
  Vec<T>* base = reinterpret_cast<Vec<T>*>(work);
  for (int r = 0; r < 2; ++r) {
    Vec<T>* dBa = base + (L + 1) * N + L * N;
    Vec<T>* dCa = dBa + L * N;
    Vec<T>* dLa = dCa + L * N;
    T* dest = r == 0 ? dest_r0 : dest_r1;
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t k = 0; k < R; ++k) {
        dest[t * P + k] += vsum<T>(dLa[t * R + k]);
        dLa[t * R + k] = vzero<T>();
      }
      for (int64_t n = 0; n < N; ++n) {
        dest[t * P + R + n] += vsum<T>(dBa[t * N + n]);
        dest[t * P + R + N + n] += vsum<T>(dCa[t * N + n]);
        dBa[t * N + n] = vzero<T>();
        dCa[t * N + n] = vzero<T>();
      }
    }
    base += mixer_direction_size(L, N, R);
  }
}

// RMSNorm over the last dim (as torch.nn.RMSNorm) of rows [begin, end)
template <typename T>
void rmsnorm_rows(const T* x, const T* w, T eps, int64_t begin, int64_t end, int64_t D, T* y) {
  for (int64_t i = begin; i < end; ++i) {
    const T* xi = x + i * D;
    T* yi = y + i * D;
    Vec<T> acc = vzero<T>();
    int64_t k = 0;
    for (; k + W <= D; k += W) {
      const Vec<T> v = vload(xi + k, W);
      acc += v * v;
    }
    T ss = vsum<T>(acc);
    for (; k < D; ++k) ss += xi[k] * xi[k];
    const T scale = T(1) / std::sqrt(ss / T(D) + eps);
    for (k = 0; k + W <= D; k += W) vstore(yi + k, vload(xi + k, W) * scale * vload(w + k, W), W);
    for (; k < D; ++k) yi[k] = xi[k] * scale * w[k];
  }
}

// Gradient of rmsnorm_rows for rows [begin, end) from dy: dx, and w's gradient added into dw (D). With
// r = 1 / sqrt(mean(x^2) + eps) (recomputed: the row is in cache for the rest anyway) and s = sum_k dy_k w_k x_k,
// dx_k = r w_k dy_k - x_k r^3 s / D and dw_k += dy_k x_k r: two passes over a row where autograd's decomposition
// of the norm made about ten over the whole tensor.
template <typename T>
void rmsnorm_backward_rows(const T* x, const T* w, T eps, const T* dy, int64_t begin, int64_t end, int64_t D, T* dx,
                           T* dw) {
  for (int64_t i = begin; i < end; ++i) {
    const T* xi = x + i * D;
    const T* gi = dy + i * D;
    T* dxi = dx + i * D;
    Vec<T> squares = vzero<T>(), dots = vzero<T>();
    int64_t k = 0;
    for (; k + W <= D; k += W) {
      const Vec<T> v = vload(xi + k, W);
      squares += v * v;
      dots += vload(gi + k, W) * vload(w + k, W) * v;
    }
    T ss = vsum<T>(squares), dot = vsum<T>(dots);
    for (; k < D; ++k) { ss += xi[k] * xi[k]; dot += gi[k] * w[k] * xi[k]; }
    const T r = T(1) / std::sqrt(ss / T(D) + eps), c = r * r * r * dot / T(D);
    for (k = 0; k + W <= D; k += W) {
      const Vec<T> v = vload(xi + k, W), g = vload(gi + k, W);
      vstore(dxi + k, r * vload(w + k, W) * g - c * v, W);
      vstore(dw + k, vload(dw + k, W) + g * v * r, W);
    }
    for (; k < D; ++k) {
      dxi[k] = r * w[k] * gi[k] - c * xi[k];
      dw[k] += gi[k] * xi[k] * r;
    }
  }
}

}  // namespace DMCLIP_ISA_NS
