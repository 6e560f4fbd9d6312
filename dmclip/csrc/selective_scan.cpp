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

// =========================================================================================================
// The whole inner part of Vim's bidirectional mixer in one call, channels-last (issue 11, part 2).
//
//   xz (batch, L, 2E) = in_proj(hidden): x = xz[..., :E], z = xz[..., E:]
//   per direction r (0 = forward in time, 1 = backward in time; weights stacked along a leading 2):
//     xc_r    = silu(depthwise conv1d(x) + conv_b_r)   causal for r = 0, anti-causal (= causal on the
//                                                     reversed sequence) for r = 1        (2, batch, L, E)
//     xdbl_r  = xc_r @ x_proj_w_r^T = [dt_low | B | C]                                    (2, batch, L, R + 2N)
//     delta_r = dt_low_r @ dt_proj_w_r^T                                                  (2, batch, L, E)
//     y_r     = selective scan of (xc_r, delta_r + dt_bias_r (softplus), A_r = -exp(A_log_r), B_r, C_r, D_r),
//               run from t = 0 up for r = 0 and from t = L - 1 down for r = 1
//   out = silu(z) * (y_0 + y_1) / 2                                                       (batch, L, E)
//
// This equals running each direction through conv1d/x_proj/dt_proj/selective_scan on a flipped copy and
// flipping back, without any flip, transpose or contiguous copy: everything is (batch, L, channels), and
// the scan is vectorised over 8 neighbouring channels (one lane each) instead of over the state, so the
// per-step softplus/silu are vector code too, the state reduction <C, x> needs no horizontal sum, and N
// needs no padding. Threads split (batch x channel blocks) in the forward (batch 1 still uses every core).
#pragma GCC diagnostic ignored "-Wpsabi"
namespace bim {

template <typename T>
struct VT { typedef T V __attribute__((vector_size(8 * sizeof(T)))); };
template <typename T>
using Vec = typename VT<T>::V;
constexpr int W = 8;          // lanes = channels per block
constexpr int kMaxN = 256;    // state size limit on this path
constexpr int kMaxR = 256;    // dt_rank limit on this path

template <typename T>
inline Vec<T> vzero() { return Vec<T>{} ; }
template <typename T>
inline Vec<T> vload(const T* p, int n) {  // n < W: the missing lanes are 0
  Vec<T> v = vzero<T>();
  if (n == W) std::memcpy(&v, p, sizeof(v)); else std::memcpy(&v, p, n * sizeof(T));
  return v;
}
template <typename T>
inline void vstore(T* p, const Vec<T>& v, int n) {
  if (n == W) std::memcpy(p, &v, sizeof(v)); else std::memcpy(p, &v, n * sizeof(T));
}
template <typename T>
inline T vsum(const Vec<T>& v) {
  T s = 0;
  for (int k = 0; k < W; ++k) s += v[k];
  return s;
}

// float: branch-free polynomial approximations (vector code); double: the libm functions (gradcheck)
inline Vec<float> vexp(Vec<float> x) { return exp8(x); }
inline Vec<double> vexp(Vec<double> x) {
  for (int k = 0; k < W; ++k) x[k] = std::exp(x[k]);
  return x;
}

inline v8f vlog1p01(v8f e) {  // log(1 + e) for e in [0, 1]: log1p_approx on 8 lanes
  const v8f w = 1.0f + e;
  v8i bits;
  std::memcpy(&bits, &w, sizeof(bits));
  const v8f exponent = __builtin_convertvector(((bits >> 23) & 0xff) - 126, v8f);
  bits = (bits & 0x807fffff) | 0x3f000000;
  v8f m;
  std::memcpy(&m, &bits, sizeof(m));
  const auto small = m < 0.707106781186547524f;
  const v8f ex = small ? exponent - 1.0f : exponent;
  const v8f x = small ? m + m - 1.0f : m - 1.0f;
  const v8f zz = x * x;
  v8f y = splat(7.0376836292e-2f);
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
  const v8f logw = x + y + 0.693359375f * ex;
  const v8f wm1 = w - 1.0f;
  const v8f safe = wm1 == 0.0f ? splat(1.0f) : wm1;
  return wm1 == 0.0f ? e : logw * (e / safe);
}

// softplus with torch's threshold 20: max(v, 0) + log1p(exp(-|v|)), the identity above 20
inline Vec<float> vsoftplus(Vec<float> v) {
  const v8f a = v < 0.0f ? -v : v;
  const v8f sp = (v > 0.0f ? v : splat(0.0f)) + vlog1p01(exp8(-a));
  return v > 20.0f ? v : sp;
}
inline Vec<double> vsoftplus(Vec<double> v) {
  for (int k = 0; k < W; ++k) v[k] = v[k] > 20.0 ? v[k] : std::log1p(std::exp(v[k]));
  return v;
}
inline Vec<float> vsigmoid(Vec<float> x) { return 1.0f / (1.0f + vexp(-x)); }
inline Vec<double> vsigmoid(Vec<double> x) { return 1.0 / (1.0 + vexp(-x)); }

template <typename T>
struct Args {
  const T* xz; const T* conv_w; const T* conv_b; const T* A_log; const T* D; const T* dt_bias;
  const T* xc; const T* xdbl; const T* delta; const T* dtproj_w;  // delta null: computed in the scan
  int64_t batch, L, E, N, R, K;
  int64_t P() const { return R + 2 * N; }
};

// ---- depthwise conv1d + silu, both directions: x (row stride 2E) -> xc (2, batch, L, E)
template <typename T>
void conv_forward(const Args<T>& a, T* xc) {
  const int64_t L = a.L, E = a.E, K = a.K, blocks = (E + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, L * K * W));
  at::parallel_for(0, 2 * a.batch * blocks, grain, [&](int64_t begin, int64_t end) {
    Vec<T> wv[64];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / (a.batch * blocks), b = (item / blocks) % a.batch, c0 = (item % blocks) * W;
      const int nc = static_cast<int>(std::min<int64_t>(W, E - c0));
      for (int64_t k = 0; k < K; ++k)
        for (int l = 0; l < W; ++l) wv[k][l] = l < nc ? a.conv_w[(r * E + c0 + l) * K + k] : T(0);
      const Vec<T> bias = vload(a.conv_b + r * E + c0, nc);
      const T* x = a.xz + b * L * 2 * E + c0;
      T* o = xc + (r * a.batch + b) * L * E + c0;
      for (int64_t t = 0; t < L; ++t) {
        Vec<T> acc = bias;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t s = r == 0 ? t + k - (K - 1) : t + (K - 1) - k;
          if (s >= 0 && s < L) acc += wv[k] * vload(x + s * 2 * E, nc);
        }
        vstore(o + t * E, acc * vsigmoid(acc), nc);
      }
    }
  });
}

// gradient of conv_forward: dxc (2, batch, L, E) -> dx (batch, L, E), dw (2, E, K), db (2, E).
// Threads own channel blocks, so dw and db need no reduction across threads.
template <typename T>
void conv_backward(const Args<T>& a, const T* dxc, T* dx, T* dw, T* db) {
  const int64_t L = a.L, E = a.E, K = a.K, blocks = (E + W - 1) / W;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    Vec<T> wv[64], dwv[64];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * W;
      const int nc = static_cast<int>(std::min<int64_t>(W, E - c0));
      for (int64_t b = 0; b < a.batch; ++b)
        for (int64_t t = 0; t < L; ++t) vstore(dx + (b * L + t) * E + c0, vzero<T>(), nc);
      for (int64_t r = 0; r < 2; ++r) {
        for (int64_t k = 0; k < K; ++k) {
          for (int l = 0; l < W; ++l) wv[k][l] = l < nc ? a.conv_w[(r * E + c0 + l) * K + k] : T(0);
          dwv[k] = vzero<T>();
        }
        const Vec<T> bias = vload(a.conv_b + r * E + c0, nc);
        Vec<T> dbv = vzero<T>();
        for (int64_t b = 0; b < a.batch; ++b) {
          const T* x = a.xz + b * L * 2 * E + c0;
          const T* g = dxc + (r * a.batch + b) * L * E + c0;
          T* dxb = dx + b * L * E + c0;
          for (int64_t t = 0; t < L; ++t) {
            Vec<T> pre = bias;
            for (int64_t k = 0; k < K; ++k) {
              const int64_t s = r == 0 ? t + k - (K - 1) : t + (K - 1) - k;
              if (s >= 0 && s < L) pre += wv[k] * vload(x + s * 2 * E, nc);
            }
            const Vec<T> sg = vsigmoid(pre);
            const Vec<T> gp = vload(g + t * E, nc) * sg * (T(1) + pre * (T(1) - sg));
            dbv += gp;
            for (int64_t k = 0; k < K; ++k) {
              const int64_t s = r == 0 ? t + k - (K - 1) : t + (K - 1) - k;
              if (s >= 0 && s < L) {
                dwv[k] += gp * vload(x + s * 2 * E, nc);
                vstore(dxb + s * E, vload(dxb + s * E, nc) + gp * wv[k], nc);
              }
            }
          }
        }
        for (int l = 0; l < nc; ++l) {
          for (int64_t k = 0; k < K; ++k) dw[(r * E + c0 + l) * K + k] = dwv[k][l];
          db[r * E + c0 + l] = dbv[l];
        }
      }
    }
  });
}

template <typename T>
inline void load_A(const Args<T>& a, int64_t r, int64_t c0, int nc, Vec<T>* Av) {
  const int64_t N = a.N, E = a.E;
  for (int64_t n = 0; n < N; ++n) {
    for (int l = 0; l < W; ++l) Av[n][l] = l < nc ? a.A_log[(r * E + c0 + l) * N + n] : T(0);
    Av[n] = -vexp(Av[n]);
  }
}

// ---- the scans: one (batch row, block of 8 channels) item runs both directions and writes the gated mean
template <typename T, int NS>
void scan_forward_item(const Args<T>& a, int64_t b, int64_t c0, T* out) {
  const int64_t L = a.L, E = a.E, N = NS > 0 ? NS : a.N, R = a.R, P = a.P();
  const int nc = static_cast<int>(std::min<int64_t>(W, E - c0));
  Vec<T> Av[NS > 0 ? NS : kMaxN], x[NS > 0 ? NS : kMaxN], wdt[kMaxR];
  for (int64_t r = 0; r < 2; ++r) {
    load_A(a, r, c0, nc, Av);
    const Vec<T> Dv = a.D ? vload(a.D + r * E + c0, nc) : vzero<T>();
    const Vec<T> bias = vload(a.dt_bias + r * E + c0, nc);
    for (int64_t n = 0; n < N; ++n) x[n] = vzero<T>();
    if (!a.delta)  // dt_proj columns of these channels: delta_t = sum_k dt_low[t, k] * W_dt[:, k]
      for (int64_t k = 0; k < R; ++k)
        for (int l = 0; l < W; ++l) wdt[k][l] = l < nc ? a.dtproj_w[(r * E + c0 + l) * R + k] : T(0);
    const T* u = a.xc + (r * a.batch + b) * L * E + c0;
    const T* dl = a.delta ? a.delta + (r * a.batch + b) * L * E + c0 : nullptr;
    const T* xd = a.xdbl + (r * a.batch + b) * L * P + R;
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = r == 0 ? s : L - 1 - s;
      const Vec<T> uv = vload(u + t * E, nc);
      Vec<T> v = bias;
      if (dl) {
        v += vload(dl + t * E, nc);
      } else {
        const T* low = xd + t * P - R;
        for (int64_t k = 0; k < R; ++k) v += wdt[k] * low[k];
      }
      const Vec<T> dt = vsoftplus(v);
      const Vec<T> dtu = dt * uv;
      const T* Bp = xd + t * P;
      const T* Cp = Bp + N;
      Vec<T> y = Dv * uv;
      for (int64_t n = 0; n < N; ++n) {
        x[n] = vexp(dt * Av[n]) * x[n] + dtu * Bp[n];
        y += x[n] * Cp[n];
      }
      T* o = out + (b * L + t) * E + c0;
      if (r == 0) {
        vstore(o, y, nc);
      } else {
        const Vec<T> z = vload(a.xz + (b * L + t) * 2 * E + E + c0, nc);
        vstore(o, (vload(o, nc) + y) * (z * vsigmoid(z)) * T(0.5), nc);
      }
    }
  }
}

template <typename T>
void scan_forward(const Args<T>& a, T* out) {
  const int64_t blocks = (a.E + W - 1) / W;
  at::parallel_for(0, a.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, c0 = (item % blocks) * W;
      switch (a.N) {
        case 16: scan_forward_item<T, 16>(a, b, c0, out); break;
        case 8: scan_forward_item<T, 8>(a, b, c0, out); break;
        default: scan_forward_item<T, 0>(a, b, c0, out);
      }
    }
  });
}

// per-thread scratch of the backward
template <typename T>
struct Scratch {
  std::vector<Vec<T>> states[2], dts[2], vs[2], dy, ysum, dBacc[2], dCacc[2];
  Scratch(int64_t L, int64_t N) : dy(L), ysum(L) {
    for (int r = 0; r < 2; ++r) {
      states[r].resize((L + 1) * N);
      dts[r].resize(L);
      vs[r].resize(L);
      dBacc[r].resize(L * N);
      dCacc[r].resize(L * N);
    }
  }
};

// Outputs of the scan backward. dA_log, dD, dbias are per task (summed over batch rows in task order).
template <typename T>
struct Grads {
  T* dxc; T* ddelta; T* dxdbl; T* dz;   // full size
};

template <typename T, int NS>
void scan_backward_item(const Args<T>& a, int64_t b, int64_t c0, const T* dout, Scratch<T>& sc, const Grads<T>& g,
                        T* dA_log, T* dD, T* dbias) {
  const int64_t L = a.L, E = a.E, N = NS > 0 ? NS : a.N, R = a.R, P = a.P();
  const int nc = static_cast<int>(std::min<int64_t>(W, E - c0));
  Vec<T> Av[NS > 0 ? NS : kMaxN], h[NS > 0 ? NS : kMaxN], dAacc[NS > 0 ? NS : kMaxN];
  // 1) recompute both directions' states and outputs
  for (int64_t r = 0; r < 2; ++r) {
    load_A(a, r, c0, nc, Av);
    const Vec<T> Dv = a.D ? vload(a.D + r * E + c0, nc) : vzero<T>();
    const Vec<T> bias = vload(a.dt_bias + r * E + c0, nc);
    Vec<T>* xs = sc.states[r].data();
    for (int64_t n = 0; n < N; ++n) xs[n] = vzero<T>();
    const T* u = a.xc + (r * a.batch + b) * L * E + c0;
    const T* dl = a.delta + (r * a.batch + b) * L * E + c0;
    const T* xd = a.xdbl + (r * a.batch + b) * L * P + R;
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = r == 0 ? s : L - 1 - s;
      const Vec<T> uv = vload(u + t * E, nc);
      const Vec<T> v = vload(dl + t * E, nc) + bias;
      const Vec<T> dt = vsoftplus(v);
      sc.vs[r][t] = v;
      sc.dts[r][t] = dt;
      const Vec<T> dtu = dt * uv;
      const T* Bp = xd + t * P;
      const T* Cp = Bp + N;
      Vec<T> y = Dv * uv;
      const Vec<T>* xprev = xs + s * N;
      Vec<T>* xt = xs + (s + 1) * N;
      for (int64_t n = 0; n < N; ++n) {
        xt[n] = vexp(dt * Av[n]) * xprev[n] + dtu * Bp[n];
        y += xt[n] * Cp[n];
      }
      sc.ysum[t] = r == 0 ? y : sc.ysum[t] + y;
    }
  }
  // 2) the gate: out = silu(z) * (y0 + y1) / 2
  for (int64_t t = 0; t < L; ++t) {
    const Vec<T> z = vload(a.xz + (b * L + t) * 2 * E + E + c0, nc);
    const Vec<T> s = vsigmoid(z);
    const Vec<T> go = vload(dout + (b * L + t) * E + c0, nc) * T(0.5);
    vstore(g.dz + (b * L + t) * E + c0, go * sc.ysum[t] * s * (T(1) + z * (T(1) - s)), nc);
    sc.dy[t] = go * z * s;
  }
  // 3) the adjoint recurrence of each direction, swept against its scan order
  for (int64_t r = 0; r < 2; ++r) {
    load_A(a, r, c0, nc, Av);
    const Vec<T> Dv = a.D ? vload(a.D + r * E + c0, nc) : vzero<T>();
    for (int64_t n = 0; n < N; ++n) { h[n] = vzero<T>(); dAacc[n] = vzero<T>(); }
    Vec<T> dDacc = vzero<T>(), dbacc = vzero<T>();
    const Vec<T>* xs = sc.states[r].data();
    const T* u = a.xc + (r * a.batch + b) * L * E + c0;
    const T* xd = a.xdbl + (r * a.batch + b) * L * P + R;
    T* du = g.dxc + (r * a.batch + b) * L * E + c0;
    T* dd = g.ddelta + (r * a.batch + b) * L * E + c0;
    Vec<T>* dBa = sc.dBacc[r].data();
    Vec<T>* dCa = sc.dCacc[r].data();
    for (int64_t s = L - 1; s >= 0; --s) {
      const int64_t t = r == 0 ? s : L - 1 - s;
      const Vec<T> dy = sc.dy[t];
      const Vec<T> uv = vload(u + t * E, nc);
      const Vec<T> dt = sc.dts[r][t];
      const Vec<T> dtu = dt * uv;
      const T* Bp = xd + t * P;
      const T* Cp = Bp + N;
      const Vec<T>* xprev = xs + s * N;
      const Vec<T>* xt = xs + (s + 1) * N;
      Vec<T>* dBt = dBa + t * N;
      Vec<T>* dCt = dCa + t * N;
      Vec<T> ddt = vzero<T>(), hB = vzero<T>();
      for (int64_t n = 0; n < N; ++n) {
        const Vec<T> hv = h[n] + dy * Cp[n];
        dCt[n] += dy * xt[n];
        const Vec<T> da = vexp(dt * Av[n]);
        const Vec<T> dlog = hv * xprev[n] * da;  // dLoss / d(dt * A)
        ddt += dlog * Av[n];
        dAacc[n] += dlog * dt;
        dBt[n] += hv * dtu;
        hB += hv * Bp[n];
        h[n] = hv * da;
      }
      ddt += hB * uv;
      vstore(du + t * E, dy * Dv + hB * dt, nc);
      const Vec<T> v = sc.vs[r][t];
      const Vec<T> dv = v > T(20) ? ddt : ddt * vsigmoid(v);
      vstore(dd + t * E, dv, nc);
      dbacc += dv;
      dDacc += dy * uv;
    }
    for (int l = 0; l < nc; ++l) {
      for (int64_t n = 0; n < N; ++n) dA_log[(r * E + c0 + l) * N + n] += dAacc[n][l] * Av[n][l];  // dA * A
      dD[r * E + c0 + l] += dDacc[l];
      dbias[r * E + c0 + l] += dbacc[l];
    }
  }
}

// dB and dC of one batch row are sums over every channel: lanes accumulate in the scratch across the
// channel blocks a task owns, then one horizontal sum per (direction, t, n) goes to dest (2, L, P) rows.
template <typename T>
void flush_BC(const Args<T>& a, Scratch<T>& sc, T* dest_r0, T* dest_r1) {
  const int64_t L = a.L, N = a.N, P = a.P(), R = a.R;
  for (int r = 0; r < 2; ++r) {
    T* dest = r == 0 ? dest_r0 : dest_r1;
    for (int64_t t = 0; t < L; ++t)
      for (int64_t n = 0; n < N; ++n) {
        dest[t * P + R + n] += vsum<T>(sc.dBacc[r][t * N + n]);
        dest[t * P + R + N + n] += vsum<T>(sc.dCacc[r][t * N + n]);
        sc.dBacc[r][t * N + n] = vzero<T>();
        sc.dCacc[r][t * N + n] = vzero<T>();
      }
  }
}

template <typename T>
void scan_backward(const Args<T>& a, const T* dout, const Grads<T>& g, T* dA_log, T* dD, T* dbias) {
  const int64_t L = a.L, E = a.E, N = a.N, P = a.P(), batch = a.batch;
  const int64_t blocks = (E + W - 1) / W;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch * blocks));
  const bool split_batch = batch >= tasks;  // else split the channel blocks (batch 1 still uses every core)
  std::vector<std::vector<T>> part_A(tasks), part_D(tasks), part_b(tasks), part_BC(tasks);
  std::fill(g.dxdbl, g.dxdbl + 2 * batch * L * P, T(0));
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    Scratch<T> sc(L, N);
    for (int64_t task = task_begin; task < task_end; ++task) {
      part_A[task].assign(2 * E * N, T(0));
      part_D[task].assign(2 * E, T(0));
      part_b[task].assign(2 * E, T(0));
      int64_t b0, b1, k0, k1;
      if (split_batch) {
        b0 = batch * task / tasks; b1 = batch * (task + 1) / tasks; k0 = 0; k1 = blocks;
      } else {
        b0 = 0; b1 = batch; k0 = blocks * task / tasks; k1 = blocks * (task + 1) / tasks;
        part_BC[task].assign(2 * batch * L * P, T(0));
      }
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = k0; k < k1; ++k) {
#define DMCLIP_BWD(NS) scan_backward_item<T, NS>(a, b, k * W, dout, sc, g, part_A[task].data(), \
                                                 part_D[task].data(), part_b[task].data())
          switch (N) {
            case 16: DMCLIP_BWD(16); break;
            case 8: DMCLIP_BWD(8); break;
            default: DMCLIP_BWD(0);
          }
#undef DMCLIP_BWD
        }
        T* base = split_batch ? g.dxdbl : part_BC[task].data();
        flush_BC(a, sc, base + b * L * P, base + (batch + b) * L * P);
      }
    }
  });
  std::fill(dA_log, dA_log + 2 * E * N, T(0));
  std::fill(dD, dD + 2 * E, T(0));
  std::fill(dbias, dbias + 2 * E, T(0));
  for (int64_t task = 0; task < tasks; ++task) {  // fixed order: deterministic for a given thread count
    if (part_A[task].empty()) continue;
    for (int64_t k = 0; k < 2 * E * N; ++k) dA_log[k] += part_A[task][k];
    for (int64_t k = 0; k < 2 * E; ++k) { dD[k] += part_D[task][k]; dbias[k] += part_b[task][k]; }
    if (!part_BC[task].empty())
      for (int64_t k = 0; k < 2 * batch * L * P; ++k) g.dxdbl[k] += part_BC[task][k];
  }
}

void check_param(const torch::Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
  check(t, name, dtype);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has shape ", t.sizes(), ", expected ", shape);
}

template <typename T>
Args<T> make_args(const torch::Tensor& xz, const torch::Tensor& conv_w, const torch::Tensor& conv_b,
                  const torch::Tensor& xproj_w, const torch::Tensor& dtproj_w, const torch::Tensor& dt_bias,
                  const torch::Tensor& A_log, const c10::optional<torch::Tensor>& D) {
  Args<T> a{};
  a.batch = xz.size(0); a.L = xz.size(1); a.E = xz.size(2) / 2;
  a.N = A_log.size(2); a.R = dtproj_w.size(2); a.K = conv_w.size(2);
  a.xz = xz.data_ptr<T>(); a.conv_w = conv_w.data_ptr<T>(); a.conv_b = conv_b.data_ptr<T>();
  a.A_log = A_log.data_ptr<T>(); a.dt_bias = dt_bias.data_ptr<T>(); a.dtproj_w = dtproj_w.data_ptr<T>();
  a.D = D.has_value() ? D->data_ptr<T>() : nullptr;
  return a;
}

void check_inputs(const torch::Tensor& xz, const torch::Tensor& conv_w, const torch::Tensor& conv_b,
                  const torch::Tensor& xproj_w, const torch::Tensor& dtproj_w, const torch::Tensor& dt_bias,
                  const torch::Tensor& A_log, const c10::optional<torch::Tensor>& D) {
  const auto dtype = xz.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "compute dtype must be float32 or float64");
  check(xz, "xz", dtype);
  TORCH_CHECK(xz.dim() == 3 && xz.size(2) % 2 == 0, "xz must be (batch, L, 2E)");
  const int64_t E = xz.size(2) / 2, N = A_log.size(-1), R = dtproj_w.size(-1), K = conv_w.size(-1);
  TORCH_CHECK(N >= 1 && N <= kMaxN, "d_state must be in 1..", kMaxN);
  TORCH_CHECK(K >= 1 && K <= 64, "d_conv must be in 1..64");
  TORCH_CHECK(R >= 1 && R <= kMaxR, "dt_rank must be in 1..", kMaxR);
  check_param(conv_w, "conv_weight", dtype, {2, E, K});
  check_param(conv_b, "conv_bias", dtype, {2, E});
  check_param(xproj_w, "x_proj_weight", dtype, {2, R + 2 * N, E});
  check_param(dtproj_w, "dt_proj_weight", dtype, {2, E, R});
  check_param(dt_bias, "dt_proj_bias", dtype, {2, E});
  check_param(A_log, "A_log", dtype, {2, E, N});
  if (D.has_value()) check_param(*D, "D", dtype, {2, E});
}

}  // namespace bim

// Returns (out, xc, xdbl); the last two are what the backward needs.
std::vector<torch::Tensor> bimamba_fwd(torch::Tensor xz, torch::Tensor conv_w, torch::Tensor conv_b,
                                       torch::Tensor xproj_w, torch::Tensor dtproj_w, torch::Tensor dt_bias,
                                       torch::Tensor A_log, c10::optional<torch::Tensor> D) {
  bim::check_inputs(xz, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D);
  const int64_t batch = xz.size(0), L = xz.size(1), E = xz.size(2) / 2, R = dtproj_w.size(2);
  auto xc = torch::empty({2, batch, L, E}, xz.options());
  auto out = torch::empty({batch, L, E}, xz.options());
  torch::Tensor xdbl, delta;
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "bimamba_fwd", [&] {
    auto a = bim::make_args<scalar_t>(xz, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D);
    bim::conv_forward(a, xc.data_ptr<scalar_t>());
    xdbl = at::bmm(xc.view({2, batch * L, E}), xproj_w.transpose(1, 2));  // (2, batch L, R + 2N)
    a.xc = xc.data_ptr<scalar_t>(); a.xdbl = xdbl.data_ptr<scalar_t>(); a.delta = nullptr;  // dt_proj in the scan
    bim::scan_forward(a, out.data_ptr<scalar_t>());
  });
  return {out, xc, xdbl};
}

// Returns (dxz, dconv_w, dconv_b, dxproj_w, ddtproj_w, ddt_bias, dA_log, dD).
std::vector<torch::Tensor> bimamba_bwd(torch::Tensor xz, torch::Tensor conv_w, torch::Tensor conv_b,
                                       torch::Tensor xproj_w, torch::Tensor dtproj_w, torch::Tensor dt_bias,
                                       torch::Tensor A_log, c10::optional<torch::Tensor> D, torch::Tensor xc,
                                       torch::Tensor xdbl, torch::Tensor dout) {
  bim::check_inputs(xz, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D);
  const int64_t batch = xz.size(0), L = xz.size(1), E = xz.size(2) / 2, R = dtproj_w.size(2);
  const int64_t N = A_log.size(2), P = R + 2 * N;
  check(dout, "dout", xz.scalar_type());
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({batch, L, E}), "dout must be (batch, L, E)");
  check(xc, "xc", xz.scalar_type());
  check(xdbl, "xdbl", xz.scalar_type());
  auto delta = at::bmm(xdbl.narrow(2, 0, R), dtproj_w.transpose(1, 2));  // (2, batch L, E), recomputed
  auto dxc = torch::empty({2, batch, L, E}, xz.options());
  auto ddelta = torch::empty({2, batch, L, E}, xz.options());
  auto dxdbl = torch::empty({2, batch * L, P}, xz.options());
  auto dz = torch::empty({batch, L, E}, xz.options());
  auto dx = torch::empty({batch, L, E}, xz.options());
  auto dA_log = torch::empty_like(A_log);
  auto dD = torch::empty({2, E}, xz.options());
  auto dbias = torch::empty_like(dt_bias);
  auto dconv_w = torch::empty_like(conv_w);
  auto dconv_b = torch::empty_like(conv_b);
  torch::Tensor dxproj_w, ddtproj_w;
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "bimamba_bwd", [&] {
    auto a = bim::make_args<scalar_t>(xz, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D);
    a.xc = xc.data_ptr<scalar_t>(); a.xdbl = xdbl.data_ptr<scalar_t>(); a.delta = delta.data_ptr<scalar_t>();
    bim::Grads<scalar_t> g{dxc.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(), dxdbl.data_ptr<scalar_t>(),
                           dz.data_ptr<scalar_t>()};
    bim::scan_backward(a, dout.data_ptr<scalar_t>(), g, dA_log.data_ptr<scalar_t>(), dD.data_ptr<scalar_t>(),
                       dbias.data_ptr<scalar_t>());
    auto ddelta_v = ddelta.view({2, batch * L, E});
    auto dt_low = xdbl.narrow(2, 0, R);
    ddtproj_w = at::bmm(ddelta_v.transpose(1, 2), dt_low);                  // (2, E, R)
    dxdbl.narrow(2, 0, R).copy_(at::bmm(ddelta_v, dtproj_w));              // (2, batch L, R)
    dxproj_w = at::bmm(dxdbl.transpose(1, 2), xc.view({2, batch * L, E}));  // (2, P, E)
    auto dxc_v = dxc.view({2, batch * L, E});
    dxc_v.baddbmm_(dxdbl, xproj_w);                                        // + dxdbl @ W_x
    bim::conv_backward(a, dxc.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dconv_w.data_ptr<scalar_t>(),
                       dconv_b.data_ptr<scalar_t>());
  });
  auto dxz = at::cat({dx, dz}, 2);
  return {dxz, dconv_w, dconv_b, dxproj_w, ddtproj_w, dbias, dA_log, D.has_value() ? dD : torch::Tensor()};
}


namespace bim {
// RMSNorm over the last dim (as torch.nn.RMSNorm): one pass per row, rows split over threads
template <typename T>
void rmsnorm(const T* x, const T* w, T eps, int64_t rows, int64_t D, T* y) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = x + i * D;
      T* yi = y + i * D;
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < D; ++k) ss += xi[k] * xi[k];
      const T scale = T(1) / std::sqrt(ss / T(D) + eps);
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) yi[k] = xi[k] * scale * w[k];
    }
  });
}
}  // namespace bim

// Inference of one whole Vim block: x + out_proj(mixer(in_proj(rmsnorm(x)))), in 6 parallel regions.
torch::Tensor bimamba_block_fwd(torch::Tensor x, torch::Tensor norm_w, double eps, torch::Tensor in_w,
                                torch::Tensor conv_w, torch::Tensor conv_b, torch::Tensor xproj_w,
                                torch::Tensor dtproj_w, torch::Tensor dt_bias, torch::Tensor A_log,
                                c10::optional<torch::Tensor> D, torch::Tensor out_w) {
  check(x, "x", x.scalar_type());
  check(norm_w, "norm weight", x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && norm_w.dim() == 1 && norm_w.size(0) == x.size(2), "x must be (batch, L, width)");
  const int64_t batch = x.size(0), L = x.size(1), width = x.size(2);
  auto h = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bimamba_rmsnorm", [&] {
    bim::rmsnorm<scalar_t>(x.data_ptr<scalar_t>(), norm_w.data_ptr<scalar_t>(), static_cast<scalar_t>(eps),
                           batch * L, width, h.data_ptr<scalar_t>());
  });
  auto xz = at::mm(h.view({batch * L, width}), in_w.t()).view({batch, L, in_w.size(0)});
  auto y = bimamba_fwd(xz, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D)[0];
  return at::addmm(x.view({batch * L, width}), y.view({batch * L, y.size(2)}), out_w.t()).view({batch, L, width});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dmclip fused selective scan for the CPU";
  m.def("fwd", &selective_scan_fwd, "selective scan forward");
  m.def("bwd", &selective_scan_bwd, "selective scan backward");
  m.def("bimamba_fwd", &bimamba_fwd, "Vim bidirectional mixer, inner part (conv, x_proj, dt_proj, both scans, gate)");
  m.def("bimamba_bwd", &bimamba_bwd, "gradient of bimamba_fwd");
  m.def("bimamba_block_fwd", &bimamba_block_fwd, "inference of a whole Vim block (norm, in_proj, mixer, out_proj, residual)");
}
