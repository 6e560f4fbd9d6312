// Fused selective scan (Mamba's S6 recurrence) for the CPU: forward and backward.
//
// Semantics are mamba-ssm's selective_scan_ref (Gu & Dao 2023, Alg. 2), real A, input-dependent B, C:
//   dt_t  = softplus(delta_t + delta_bias)          (or delta_t + delta_bias)
//   x_t   = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t           x: (N,) per (batch, channel)
//   y_t   = <C_t, x_t> + D * u_t;   out_t = y_t * silu(z_t)
// Shapes: u, delta, z, out: (batch, dim, L); A: (dim, N); Bt, Ct: (batch, L, N) (transposed by the caller
// so that the state dimension is contiguous); D, delta_bias: (dim,); last_state: (batch, dim, N).
//
// Nothing of size (batch, dim, L, N) is ever allocated: each (batch, channel) pair keeps its state in a
// small local array, and the backward recomputes the forward states of one pair into an (L, N) scratch
// buffer before sweeping backwards. Threads split the work over (batch x channel) in the forward and over
// channels in the backward (dB, dC are summed over channels in per-thread buffers, reduced in order, so
// results are deterministic for a given thread count). The state loop over N is written so that gcc
// vectorises it, including the exponential (a branch-free Cephes-style expf).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// exp for float: Cephes polynomial (about 1 ulp on the clamped range), branch-free so loops vectorise.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.33654f), 88.37626f);
  // round(x / ln2) with the 1.5 * 2^23 trick: exact for |x / ln2| < 2^22, vectorises without SSE4.1
  float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - k * 0.693359375f;
  r = r - k * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

inline double exp_approx(double x) { return std::exp(x); }  // float64 serves gradcheck, not speed

template <typename T>
inline T softplus(T x) {  // torch.nn.functional.softplus with threshold 20, as mamba-ssm
  return x > T(20) ? x : std::log1p(std::exp(x));
}

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T>
struct Pointers {
  const T* u; const T* delta; const T* A; const T* Bt; const T* Ct;
  const T* D; const T* z; const T* delta_bias;
  int64_t batch, dim, L, N;
  bool softplus;
};

template <typename T>
inline T step_dt(const Pointers<T>& p, int64_t d, T delta) {
  T v = delta + (p.delta_bias ? p.delta_bias[d] : T(0));
  return p.softplus ? softplus(v) : v;
}

template <typename T>
void forward_kernel(const Pointers<T>& p, T* out, T* last_state) {
  const int64_t L = p.L, N = p.N, dim = p.dim;
  at::parallel_for(0, p.batch * dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> state(N);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / dim, d = i % dim;
      const T* u = p.u + i * L;
      const T* delta = p.delta + i * L;
      const T* z = p.z ? p.z + i * L : nullptr;
      const T* A = p.A + d * N;
      const T* Bt = p.Bt + b * L * N;
      const T* Ct = p.Ct + b * L * N;
      const T Dd = p.D ? p.D[d] : T(0);
      T* x = state.data();
      std::fill(x, x + N, T(0));
      T* o = out + i * L;
      for (int64_t t = 0; t < L; ++t) {
        const T dt = step_dt(p, d, delta[t]);
        const T dtu = dt * u[t];
        const T* Bn = Bt + t * N;
        const T* Cn = Ct + t * N;
        T y = 0;
#pragma omp simd reduction(+ : y)
        for (int64_t n = 0; n < N; ++n) {
          const T xn = exp_approx(dt * A[n]) * x[n] + dtu * Bn[n];
          x[n] = xn;
          y += xn * Cn[n];
        }
        T v = y + Dd * u[t];
        if (z) v = v * z[t] * sigmoid(z[t]);
        o[t] = v;
      }
      if (last_state) std::copy(x, x + N, last_state + i * N);
    }
  });
}

template <typename T>
void backward_kernel(const Pointers<T>& p, const T* dout, const T* dlast, T* du, T* ddelta, T* dA, T* dBt,
                     T* dCt, T* dD, T* dz, T* ddelta_bias) {
  const int64_t L = p.L, N = p.N, dim = p.dim, batch = p.batch;
  // channels are split into contiguous blocks, one per task; dB and dC get one buffer per block
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(dim, at::get_num_threads()));
  const int64_t per_task = (dim + tasks - 1) / tasks;
  std::vector<std::vector<T>> dB_parts(tasks), dC_parts(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<T> states(L * N), decays(L * N), dts(L), ys(L), h(N);
    for (int64_t task = task_begin; task < task_end; ++task) {
      std::vector<T>& dBp = dB_parts[task];
      std::vector<T>& dCp = dC_parts[task];
      dBp.assign(batch * L * N, T(0));
      dCp.assign(batch * L * N, T(0));
      const int64_t d_end = std::min(dim, (task + 1) * per_task);
      for (int64_t d = task * per_task; d < d_end; ++d) {
        const T* A = p.A + d * N;
        const T Dd = p.D ? p.D[d] : T(0);
        T* dAd = dA + d * N;
        T dD_acc = 0, dbias_acc = 0;
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t i = b * dim + d;
          const T* u = p.u + i * L;
          const T* delta = p.delta + i * L;
          const T* z = p.z ? p.z + i * L : nullptr;
          const T* Bt = p.Bt + b * L * N;
          const T* Ct = p.Ct + b * L * N;
          const T* g = dout + i * L;
          // 1) recompute the forward states of this (batch, channel) pair
          T* xs = states.data();
          T* as = decays.data();
          for (int64_t t = 0; t < L; ++t) {
            const T dt = step_dt(p, d, delta[t]);
            dts[t] = dt;
            const T dtu = dt * u[t];
            const T* Bn = Bt + t * N;
            const T* Cn = Ct + t * N;
            const T* xprev = t > 0 ? xs + (t - 1) * N : nullptr;
            T* xt = xs + t * N;
            T* at = as + t * N;
            T y = 0;
#pragma omp simd reduction(+ : y)
            for (int64_t n = 0; n < N; ++n) {
              const T a = exp_approx(dt * A[n]);
              const T xn = (xprev ? a * xprev[n] : T(0)) + dtu * Bn[n];
              at[n] = a;
              xt[n] = xn;
              y += xn * Cn[n];
            }
            ys[t] = y;
          }
          // 2) sweep backwards; h holds dLoss/dx_t, starting from the gradient of the last state
          if (dlast) {
            std::copy(dlast + i * N, dlast + (i + 1) * N, h.begin());
          } else {
            std::fill(h.begin(), h.end(), T(0));
          }
          T* hn = h.data();
          T* dBb = dBp.data() + b * L * N;
          T* dCb = dCp.data() + b * L * N;
          T* du_i = du + i * L;
          T* ddelta_i = ddelta + i * L;
          T* dz_i = dz ? dz + i * L : nullptr;
          for (int64_t t = L - 1; t >= 0; --t) {
            T dy = g[t];
            if (z) {
              const T s = sigmoid(z[t]);
              const T pre = ys[t] + Dd * u[t];
              dz_i[t] = g[t] * pre * s * (T(1) + z[t] * (T(1) - s));
              dy = g[t] * z[t] * s;
            }
            dD_acc += dy * u[t];
            const T dt = dts[t];
            const T dtu = dt * u[t];
            const T* Bn = Bt + t * N;
            const T* Cn = Ct + t * N;
            const T* xt = xs + t * N;
            const T* xprev = t > 0 ? xs + (t - 1) * N : nullptr;
            const T* at = as + t * N;
            T* dBn = dBb + t * N;
            T* dCn = dCb + t * N;
            T ddt = 0, hB = 0;
#pragma omp simd reduction(+ : ddt, hB)
            for (int64_t n = 0; n < N; ++n) {
              const T hv = hn[n] + dy * Cn[n];
              dCn[n] += dy * xt[n];
              const T dlog = xprev ? hv * xprev[n] * at[n] : T(0);  // dLoss / d(dt * A[n])
              ddt += dlog * A[n];
              dAd[n] += dlog * dt;
              dBn[n] += hv * dtu;
              hB += hv * Bn[n];
              hn[n] = hv * at[n];
            }
            ddt += hB * u[t];
            du_i[t] = dy * Dd + hB * dt;
            T dd = ddt;
            if (p.softplus) {
              const T v = delta[t] + (p.delta_bias ? p.delta_bias[d] : T(0));
              dd = v > T(20) ? ddt : ddt * sigmoid(v);
            }
            ddelta_i[t] = dd;
            dbias_acc += dd;
          }
        }
        if (dD) dD[d] = dD_acc;
        if (ddelta_bias) ddelta_bias[d] = dbias_acc;
      }
    }
  });
  // reduce the per-task dB, dC buffers in task order (deterministic)
  const int64_t size = batch * L * N;
  std::fill(dBt, dBt + size, T(0));
  std::fill(dCt, dCt + size, T(0));
  for (int64_t task = 0; task < tasks; ++task) {
    if (dB_parts[task].empty()) continue;
    const T* sb = dB_parts[task].data();
    const T* sc = dC_parts[task].data();
    for (int64_t k = 0; k < size; ++k) {
      dBt[k] += sb[k];
      dCt[k] += sc[k];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// float32 fast path: the state dimension (padded by the caller to a multiple of 8) is held in 8-wide GCC
// vector registers across the whole sequence; per-step scalars (softplus, silu) are computed in a prepass
// over L that gcc auto-vectorises. The generic template above serves float64 and unpadded shapes.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int kMaxVectors = 32;  // N <= 256 on the fast path

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline float hsum(v8f v) {
  float s = 0;
  for (int k = 0; k < 8; ++k) s += v[k];
  return s;
}

inline v8f exp8(v8f x) {  // exp_approx on 8 lanes
  x = x < splat(-87.33654f) ? splat(-87.33654f) : x;
  x = x > splat(88.37626f) ? splat(88.37626f) : x;
  v8f k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  v8f r = x - k * 0.693359375f;
  r = r - k * (-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  v8i bits = (__builtin_convertvector(k, v8i) + 127) << 23;
  return p * reinterpret_cast<v8f&>(bits);
}

// log(1 + e) for e in [0, 1] (Cephes logf on w = 1 + e, then Goldberg's correction for tiny e)
inline float log1p_approx(float e) {
  const float w = 1.0f + e;
  int32_t bits;
  std::memcpy(&bits, &w, sizeof(float));
  const float exponent = static_cast<float>(((bits >> 23) & 0xff) - 126);
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(float));
  const bool small = m < 0.707106781186547524f;
  const float ex = small ? exponent - 1.0f : exponent;
  const float x = small ? m + m - 1.0f : m - 1.0f;
  const float zz = x * x;
  float y = 7.0376836292e-2f;
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
  const float logw = x + y + 0.693359375f * ex;
  const float wm1 = w - 1.0f;
  return wm1 == 0.0f ? e : logw * (e / wm1);
}

// per-step scalars of one (batch, channel) row; loops over L are auto-vectorised
struct RowScalars {
  std::vector<float> v, dt, dtu, gate, dgate;
  explicit RowScalars(int64_t L) : v(L), dt(L), dtu(L), gate(L), dgate(L) {}
  void compute(const float* u, const float* delta, const float* z, float bias, bool use_softplus, int64_t L) {
    float* vp = v.data(); float* dtp = dt.data(); float* dtup = dtu.data();
    for (int64_t t = 0; t < L; ++t) {
      const float x = delta[t] + bias;
      vp[t] = x;
      float d = x;
      if (use_softplus) {  // softplus(x) = max(x, 0) + log1p(exp(-|x|)), identity above 20 as torch
        const float e = exp_approx(-std::fabs(x));
        const float sp = std::max(x, 0.0f) + log1p_approx(e);
        d = x > 20.0f ? x : sp;
      }
      dtp[t] = d;
      dtup[t] = d * u[t];
    }
    if (z) {
      float* g = gate.data(); float* dg = dgate.data();
      for (int64_t t = 0; t < L; ++t) {
        const float s = 1.0f / (1.0f + exp_approx(-z[t]));
        g[t] = z[t] * s;
        dg[t] = s * (1.0f + z[t] * (1.0f - s));
      }
    }
  }
};

template <int VC>
void forward_row_fast(const Pointers<float>& p, int64_t i, RowScalars& rs, float* out, float* last_state) {
  const int64_t L = p.L, N = p.N, dim = p.dim;
  const int V = VC > 0 ? VC : static_cast<int>(N / 8);
  const int64_t b = i / dim, d = i % dim;
  const float* u = p.u + i * L;
  const float* z = p.z ? p.z + i * L : nullptr;
  rs.compute(u, p.delta + i * L, z, p.delta_bias ? p.delta_bias[d] : 0.0f, p.softplus, L);
  const float* Bt = p.Bt + b * L * N;
  const float* Ct = p.Ct + b * L * N;
  v8f Av[kMaxVectors], x[kMaxVectors];
  for (int j = 0; j < V; ++j) { Av[j] = load8(p.A + d * N + 8 * j); x[j] = splat(0.0f); }
  const float Dd = p.D ? p.D[d] : 0.0f;
  float* o = out + i * L;
  for (int64_t t = 0; t < L; ++t) {
    const v8f dt = splat(rs.dt[t]);
    const v8f dtu = splat(rs.dtu[t]);
    v8f acc = splat(0.0f);
    for (int j = 0; j < V; ++j) {
      x[j] = exp8(dt * Av[j]) * x[j] + dtu * load8(Bt + t * N + 8 * j);
      acc += x[j] * load8(Ct + t * N + 8 * j);
    }
    o[t] = hsum(acc) + Dd * u[t];
  }
  if (z) for (int64_t t = 0; t < L; ++t) o[t] *= rs.gate[t];
  if (last_state) for (int j = 0; j < V; ++j) store8(last_state + i * N + 8 * j, x[j]);
}

void forward_fast(const Pointers<float>& p, float* out, float* last_state) {
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    RowScalars rs(p.L);
    for (int64_t i = begin; i < end; ++i) {
      switch (p.N / 8) {
        case 1: forward_row_fast<1>(p, i, rs, out, last_state); break;
        case 2: forward_row_fast<2>(p, i, rs, out, last_state); break;
        case 4: forward_row_fast<4>(p, i, rs, out, last_state); break;
        default: forward_row_fast<0>(p, i, rs, out, last_state);
      }
    }
  });
}

template <int VC>
void backward_row_fast(const Pointers<float>& p, int64_t b, int64_t d, RowScalars& rs, std::vector<v8f>& xs,
                       std::vector<v8f>& as, std::vector<float>& ys, v8f* dA_acc, float& dD_acc, float& dbias_acc,
                       const float* dout, const float* dlast, float* du, float* ddelta, float* dBb, float* dCb,
                       float* dz) {
  const int64_t L = p.L, N = p.N, dim = p.dim;
  const int V = VC > 0 ? VC : static_cast<int>(N / 8);
  const int64_t i = b * dim + d;
  const float* u = p.u + i * L;
  const float* delta = p.delta + i * L;
  const float* z = p.z ? p.z + i * L : nullptr;
  rs.compute(u, delta, z, p.delta_bias ? p.delta_bias[d] : 0.0f, p.softplus, L);
  const float* Bt = p.Bt + b * L * N;
  const float* Ct = p.Ct + b * L * N;
  const float Dd = p.D ? p.D[d] : 0.0f;
  v8f Av[kMaxVectors], h[kMaxVectors];
  for (int j = 0; j < V; ++j) Av[j] = load8(p.A + d * N + 8 * j);
  // 1) recompute the states: xs[(t + 1) * V + j] holds x_t, xs[j] = x_{-1} = 0
  for (int j = 0; j < V; ++j) xs[j] = splat(0.0f);
  for (int64_t t = 0; t < L; ++t) {
    const v8f dt = splat(rs.dt[t]);
    const v8f dtu = splat(rs.dtu[t]);
    v8f acc = splat(0.0f);
    for (int j = 0; j < V; ++j) {
      const v8f a = exp8(dt * Av[j]);
      const v8f xn = a * xs[t * V + j] + dtu * load8(Bt + t * N + 8 * j);
      as[t * V + j] = a;
      xs[(t + 1) * V + j] = xn;
      acc += xn * load8(Ct + t * N + 8 * j);
    }
    ys[t] = hsum(acc);
  }
  // 2) sweep backwards; h holds dLoss/dx_t (times a_{t+1} once step t is done)
  for (int j = 0; j < V; ++j) h[j] = dlast ? load8(dlast + i * N + 8 * j) : splat(0.0f);
  for (int64_t t = L - 1; t >= 0; --t) {
    float dy = dout[t];
    if (z) {
      dz[t] = dout[t] * (ys[t] + Dd * u[t]) * rs.dgate[t];
      dy = dout[t] * rs.gate[t];
    }
    dD_acc += dy * u[t];
    const float dt_s = rs.dt[t];
    const v8f dt = splat(dt_s);
    const v8f dtu = splat(rs.dtu[t]);
    const v8f dyv = splat(dy);
    v8f ddt_v = splat(0.0f), hB_v = splat(0.0f);
    for (int j = 0; j < V; ++j) {
      const v8f hv = h[j] + dyv * load8(Ct + t * N + 8 * j);
      float* dC = dCb + t * N + 8 * j;
      store8(dC, load8(dC) + dyv * xs[(t + 1) * V + j]);
      const v8f a = as[t * V + j];
      const v8f dlog = hv * xs[t * V + j] * a;  // dLoss / d(dt * A)
      ddt_v += dlog * Av[j];
      dA_acc[j] += dlog * dt;
      float* dB = dBb + t * N + 8 * j;
      store8(dB, load8(dB) + hv * dtu);
      hB_v += hv * load8(Bt + t * N + 8 * j);
      h[j] = hv * a;
    }
    const float hB = hsum(hB_v);
    const float ddt = hsum(ddt_v) + hB * u[t];
    du[i * L + t] = dy * Dd + hB * dt_s;
    float dd = ddt;
    if (p.softplus) {
      const float v = rs.v[t];
      dd = v > 20.0f ? ddt : ddt / (1.0f + exp_approx(-v));
    }
    ddelta[i * L + t] = dd;
    dbias_acc += dd;
  }
}

void backward_fast(const Pointers<float>& p, const float* dout, const float* dlast, float* du, float* ddelta, float* dA,
                   float* dBt, float* dCt, float* dD, float* dz, float* ddelta_bias) {
  const int64_t L = p.L, N = p.N, dim = p.dim, batch = p.batch;
  const int V = static_cast<int>(N / 8);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(dim, at::get_num_threads()));
  const int64_t per_task = (dim + tasks - 1) / tasks;
  std::vector<std::vector<float>> dB_parts(tasks), dC_parts(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    RowScalars rs(L);
    std::vector<v8f> xs((L + 1) * V), as(L * V);
    std::vector<float> ys(L);
    for (int64_t task = task_begin; task < task_end; ++task) {
      std::vector<float>& dBp = dB_parts[task];
      std::vector<float>& dCp = dC_parts[task];
      dBp.assign(batch * L * N, 0.0f);
      dCp.assign(batch * L * N, 0.0f);
      const int64_t d_end = std::min(dim, (task + 1) * per_task);
      for (int64_t d = task * per_task; d < d_end; ++d) {
        v8f dA_acc[kMaxVectors];
        for (int j = 0; j < V; ++j) dA_acc[j] = splat(0.0f);
        float dD_acc = 0, dbias_acc = 0;
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t i = b * dim + d;
          float* dz_i = dz ? dz + i * L : nullptr;
          float* dBb = dBp.data() + b * L * N;
          float* dCb = dCp.data() + b * L * N;
#define DMCLIP_ROW(VC) backward_row_fast<VC>(p, b, d, rs, xs, as, ys, dA_acc, dD_acc, dbias_acc, dout + i * L, \
                                             dlast, du, ddelta, dBb, dCb, dz_i)
          switch (V) {
            case 1: DMCLIP_ROW(1); break;
            case 2: DMCLIP_ROW(2); break;
            case 4: DMCLIP_ROW(4); break;
            default: DMCLIP_ROW(0);
          }
#undef DMCLIP_ROW
        }
        for (int j = 0; j < V; ++j) store8(dA + d * N + 8 * j, dA_acc[j]);
        if (dD) dD[d] = dD_acc;
        if (ddelta_bias) ddelta_bias[d] = dbias_acc;
      }
    }
  });
  const int64_t size = batch * L * N;
  std::fill(dBt, dBt + size, 0.0f);
  std::fill(dCt, dCt + size, 0.0f);
  for (int64_t task = 0; task < tasks; ++task) {
    if (dB_parts[task].empty()) continue;
    const float* sb = dB_parts[task].data();
    const float* sc = dC_parts[task].data();
    for (int64_t k = 0; k < size; ++k) {
      dBt[k] += sb[k];
      dCt[k] += sc[k];
    }
  }
}

inline bool use_fast(const Pointers<float>& p) { return p.N % 8 == 0 && p.N / 8 <= kMaxVectors; }

// float32 takes the vector path when N is a multiple of 8 (the Python side pads it); float64 the generic one
void run_forward(const Pointers<float>& p, float* out, float* last) {
  if (use_fast(p)) return forward_fast(p, out, last);
  forward_kernel<float>(p, out, last);
}
void run_forward(const Pointers<double>& p, double* out, double* last) { forward_kernel<double>(p, out, last); }

template <typename T>
void run_backward(const Pointers<T>& p, const T* dout, const T* dlast, T* du, T* ddelta, T* dA, T* dBt, T* dCt, T* dD,
                  T* dz, T* ddelta_bias) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_fast(p)) return backward_fast(p, dout, dlast, du, ddelta, dA, dBt, dCt, dD, dz, ddelta_bias);
  }
  backward_kernel<T>(p, dout, dlast, du, ddelta, dA, dBt, dCt, dD, dz, ddelta_bias);
}

void check(const torch::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have the compute dtype");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

template <typename T>
Pointers<T> pointers(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                     const torch::Tensor& Bt, const torch::Tensor& Ct, const c10::optional<torch::Tensor>& D,
                     const c10::optional<torch::Tensor>& z, const c10::optional<torch::Tensor>& delta_bias,
                     bool delta_softplus) {
  Pointers<T> p;
  p.u = u.data_ptr<T>();
  p.delta = delta.data_ptr<T>();
  p.A = A.data_ptr<T>();
  p.Bt = Bt.data_ptr<T>();
  p.Ct = Ct.data_ptr<T>();
  p.D = D.has_value() ? D->data_ptr<T>() : nullptr;
  p.z = z.has_value() ? z->data_ptr<T>() : nullptr;
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<T>() : nullptr;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.L = u.size(2);
  p.N = A.size(1);
  p.softplus = delta_softplus;
  return p;
}

void check_all(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bt,
               const torch::Tensor& Ct, const c10::optional<torch::Tensor>& D, const c10::optional<torch::Tensor>& z,
               const c10::optional<torch::Tensor>& delta_bias) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "compute dtype must be float32 or float64");
  check(u, "u", dtype);
  check(delta, "delta", dtype);
  check(A, "A", dtype);
  check(Bt, "B", dtype);
  check(Ct, "C", dtype);
  if (D.has_value()) check(*D, "D", dtype);
  if (z.has_value()) check(*z, "z", dtype);
  if (delta_bias.has_value()) check(*delta_bias, "delta_bias", dtype);
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must be (batch, dim, L)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "A must be (dim, N)");
  TORCH_CHECK(Bt.dim() == 3 && Bt.size(0) == u.size(0) && Bt.size(1) == u.size(2) && Bt.size(2) == A.size(1),
              "B must be (batch, L, N) here");
  TORCH_CHECK(Ct.sizes() == Bt.sizes(), "C must be (batch, L, N) here");
}

}  // namespace

// Returns (out, last_state); last_state is empty unless requested.
std::vector<torch::Tensor> selective_scan_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                              torch::Tensor Ct, c10::optional<torch::Tensor> D,
                                              c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> delta_bias,
                                              bool delta_softplus, bool return_last_state) {
  check_all(u, delta, A, Bt, Ct, D, z, delta_bias);
  auto out = torch::empty_like(u);
  auto last = return_last_state ? torch::empty({u.size(0), u.size(1), A.size(1)}, u.options()) : torch::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
    auto p = pointers<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus);
    scalar_t* last_ptr = return_last_state ? last.data_ptr<scalar_t>() : nullptr;
    run_forward(p, out.data_ptr<scalar_t>(), last_ptr);
  });
  return {out, last};
}

// Returns (du, ddelta, dA, dBt, dCt, dD, dz, ddelta_bias); the optional ones are empty when not given.
std::vector<torch::Tensor> selective_scan_bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                              torch::Tensor Ct, c10::optional<torch::Tensor> D,
                                              c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> delta_bias,
                                              bool delta_softplus, torch::Tensor dout,
                                              c10::optional<torch::Tensor> dlast) {
  check_all(u, delta, A, Bt, Ct, D, z, delta_bias);
  check(dout, "dout", u.scalar_type());
  if (dlast.has_value()) check(*dlast, "dlast_state", u.scalar_type());
  auto du = torch::empty_like(u);
  auto ddelta = torch::empty_like(u);
  auto dA = torch::zeros_like(A);
  auto dBt = torch::empty_like(Bt);
  auto dCt = torch::empty_like(Ct);
  auto empty = torch::empty({0}, u.options());
  auto dD = D.has_value() ? torch::empty_like(*D) : empty;
  auto dz = z.has_value() ? torch::empty_like(*z) : empty;
  auto dbias = delta_bias.has_value() ? torch::empty_like(*delta_bias) : empty;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_bwd", [&] {
    auto p = pointers<scalar_t>(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus);
    run_backward(p, dout.data_ptr<scalar_t>(), dlast.has_value() ? dlast->data_ptr<scalar_t>() : nullptr,
                              du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(),
                              dBt.data_ptr<scalar_t>(), dCt.data_ptr<scalar_t>(),
                              D.has_value() ? dD.data_ptr<scalar_t>() : nullptr,
                              z.has_value() ? dz.data_ptr<scalar_t>() : nullptr,
                              delta_bias.has_value() ? dbias.data_ptr<scalar_t>() : nullptr);
  });
  return {du, ddelta, dA, dBt, dCt, dD, dz, dbias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dmclip fused selective scan for the CPU";
  m.def("fwd", &selective_scan_fwd, "selective scan forward");
  m.def("bwd", &selective_scan_bwd, "selective scan backward");
}
