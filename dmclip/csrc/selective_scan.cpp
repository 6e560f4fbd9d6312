// Fused selective scan (Mamba's S6 recurrence) for the CPU, and Vim's bidirectional mixer: forward and
// backward, threads over batch x channels, vectorised over channels with a runtime choice of instruction set.
//
// Semantics are mamba-ssm's selective_scan_ref (Gu & Dao 2023, Alg. 2), real A, input-dependent B, C:
//   dt_t  = softplus(delta_t + delta_bias)          (or delta_t + delta_bias)
//   x_t   = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t           x: (N,) per (batch, channel)
//   y_t   = <C_t, x_t> + D * u_t;   out_t = y_t * silu(z_t)
// Shapes (mamba-ssm's): u, delta, z, out: (batch, dim, L); A: (dim, N); B, C: (batch, N, L); D, delta_bias:
// (dim,); last_state: (batch, dim, N). Nothing of size (batch, dim, L, N) is ever allocated.
//
// Instruction sets. On x86-64 the lane kernels (scan_lanes.h) are compiled three times: for AVX-512 (16
// channels per vector), for AVX2 + FMA (8) and for the baseline CPU (8, portable vector code), the first two
// inside target regions (scan_isa.h), so the .so itself needs nothing beyond baseline x86-64. Elsewhere, and
// with DMCLIP_SCAN_NO_SIMD=1, only the portable copy is compiled. `isa()` says which copy runs: the best the
// CPU reports (__builtin_cpu_supports), or the one `set_isa` forces. "scalar" runs the generic scan's plain
// loops below (also the float64 path, for gradcheck) and the portable copy of the mixer kernels.
//
// Threads: at::parallel_for is a header template. With torch's OpenMP backend (Linux wheels) it threads only
// where this file is compiled with OpenMP; without, every loop runs on the calling thread (`threaded()`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/record_function.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with tensor casters (not torch/extension.h: it compiles for minutes)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "scan_isa.h"

namespace dmclip {
namespace {

// What task `task` of `tasks` owns in a backward driver: whole batch rows [b0, b1) when split_batch, else
// channel blocks [k0, k1) of every row
struct TaskRange { int64_t b0, b1, k0, k1; };
inline TaskRange task_range(int64_t task, int64_t tasks, bool split_batch, int64_t batch, int64_t blocks) {
  if (split_batch) return {batch * task / tasks, batch * (task + 1) / tasks, 0, blocks};
  return {0, batch, blocks * task / tasks, blocks * (task + 1) / tasks};
}

// ------------------------------------------------------------------ the generic scan: scalar loops
// One (batch, channel) row at a time with libm's exp: the float64 path (gradcheck) and, forced, the float32
// fallback the tests hold against the reference like the lane kernels.
template <typename T>
inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }  // torch's threshold 20
template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T>
void scalar_forward(const ScanArgs<T>& p, T* out, T* last) {
  const int64_t L = p.L, N = p.N, dim = p.dim;
  at::parallel_for(0, p.batch * dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> x(N);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / dim, d = i % dim;
      const T* u = p.u + i * L;
      const T* delta = p.delta + i * L;
      const T* A = p.A + d * N;
      const T* Bb = p.B + b * N * L;
      const T* Cb = p.C + b * N * L;
      const T bias = p.delta_bias ? p.delta_bias[d] : T(0);
      std::fill(x.begin(), x.end(), T(0));
      for (int64_t t = 0; t < L; ++t) {
        const T v = delta[t] + bias;
        const T dt = p.softplus ? softplus(v) : v;
        const T dtu = dt * u[t];
        T y = p.D ? p.D[d] * u[t] : T(0);
        for (int64_t n = 0; n < N; ++n) {
          x[n] = std::exp(dt * A[n]) * x[n] + dtu * Bb[n * L + t];
          y += x[n] * Cb[n * L + t];
        }
        if (p.z) y *= p.z[i * L + t] * sigmoid(p.z[i * L + t]);
        out[i * L + t] = y;
      }
      if (last) std::copy(x.begin(), x.end(), last + i * N);
    }
  });
}

// threads split the channels; dB and dC (sums over channels) go to one buffer per task, reduced in order
template <typename T>
void scalar_backward(const ScanArgs<T>& p, const T* dout, const T* dlast, const ScanGrads<T>& g, T* dA, T* dB,
                     T* dC, T* dD, T* dbias) {
  const int64_t L = p.L, N = p.N, dim = p.dim, batch = p.batch;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(dim, at::get_num_threads()));
  const int64_t per_task = (dim + tasks - 1) / tasks;
  std::vector<std::vector<T>> dB_parts(tasks), dC_parts(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<T> xs((L + 1) * N), dts(L), ys(L), h(N);
    for (int64_t task = task_begin; task < task_end; ++task) {
      dB_parts[task].assign(batch * N * L, T(0));
      dC_parts[task].assign(batch * N * L, T(0));
      for (int64_t d = task * per_task; d < std::min(dim, (task + 1) * per_task); ++d) {
        const T* A = p.A + d * N;
        const T Dd = p.D ? p.D[d] : T(0);
        const T bias = p.delta_bias ? p.delta_bias[d] : T(0);
        T dD_acc = 0, dbias_acc = 0;
        for (int64_t n = 0; n < N; ++n) dA[d * N + n] = T(0);
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t i = b * dim + d;
          const T* u = p.u + i * L;
          const T* delta = p.delta + i * L;
          const T* z = p.z ? p.z + i * L : nullptr;
          const T* Bb = p.B + b * N * L;
          const T* Cb = p.C + b * N * L;
          T* dBb = dB_parts[task].data() + b * N * L;
          T* dCb = dC_parts[task].data() + b * N * L;
          // 1) recompute the states of this row: xs[(t + 1) N + n] = x_t
          std::fill(xs.begin(), xs.begin() + N, T(0));
          for (int64_t t = 0; t < L; ++t) {
            const T v = delta[t] + bias;
            const T dt = p.softplus ? softplus(v) : v;
            dts[t] = dt;
            T y = 0;
            for (int64_t n = 0; n < N; ++n) {
              xs[(t + 1) * N + n] = std::exp(dt * A[n]) * xs[t * N + n] + dt * u[t] * Bb[n * L + t];
              y += xs[(t + 1) * N + n] * Cb[n * L + t];
            }
            ys[t] = y;
          }
          // 2) sweep backwards; h holds dLoss/dx_t
          for (int64_t n = 0; n < N; ++n) h[n] = dlast ? dlast[i * N + n] : T(0);
          for (int64_t t = L - 1; t >= 0; --t) {
            T dy = dout[i * L + t];
            if (z) {
              const T s = sigmoid(z[t]);
              g.dz[i * L + t] = dy * (ys[t] + Dd * u[t]) * s * (T(1) + z[t] * (T(1) - s));
              dy = dy * z[t] * s;
            }
            dD_acc += dy * u[t];
            const T dt = dts[t];
            T ddt = 0, hB = 0;
            for (int64_t n = 0; n < N; ++n) {
              const T a = std::exp(dt * A[n]);
              const T hv = h[n] + dy * Cb[n * L + t];
              dCb[n * L + t] += dy * xs[(t + 1) * N + n];
              const T dlog = hv * xs[t * N + n] * a;  // dLoss / d(dt A_n)
              ddt += dlog * A[n];
              dA[d * N + n] += dlog * dt;
              dBb[n * L + t] += hv * dt * u[t];
              hB += hv * Bb[n * L + t];
              h[n] = hv * a;
            }
            ddt += hB * u[t];
            g.du[i * L + t] = dy * Dd + hB * dt;
            const T v = delta[t] + bias;
            const T dd = p.softplus && v <= T(20) ? ddt * sigmoid(v) : ddt;
            g.ddelta[i * L + t] = dd;
            dbias_acc += dd;
          }
        }
        if (dD) dD[d] = dD_acc;
        if (dbias) dbias[d] = dbias_acc;
      }
    }
  });
  std::fill(dB, dB + batch * N * L, T(0));
  std::fill(dC, dC + batch * N * L, T(0));
  for (int64_t task = 0; task < tasks; ++task) {
    if (dB_parts[task].empty()) continue;
    for (int64_t k = 0; k < batch * N * L; ++k) {
      dB[k] += dB_parts[task][k];
      dC[k] += dC_parts[task][k];
    }
  }
}

// ------------------------------------------------------------------- the generic scan: lane kernels
template <typename T>
void lanes_forward(const ScanArgs<T>& p, T* out, T* last) {
  const LaneKernels<T>& k = lane_kernels<T>();
  const int64_t blocks = (p.dim + k.lanes - 1) / k.lanes;
  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    Work<T> work(k.scan_work(p.L, p.N));
    for (int64_t item = begin; item < end; ++item)
      k.scan_fwd(p, item / blocks, (item % blocks) * k.lanes, work.data(), out, last);
  });
}

// Work is split into one task per thread: whole batch rows when there are enough of them, else channel
// blocks of every row (batch 1 still uses every core). Per-task partial sums (dA, dD, d delta_bias, and dB,
// dC when tasks share rows) are reduced in task order: deterministic for a given thread count.
template <typename T>
void lanes_backward(const ScanArgs<T>& p, const T* dout, const T* dlast, const ScanGrads<T>& g, T* dA, T* dB,
                    T* dC, T* dD, T* dbias) {
  const LaneKernels<T>& k = lane_kernels<T>();
  const int64_t L = p.L, N = p.N, dim = p.dim, batch = p.batch, W = k.lanes;
  const int64_t blocks = (dim + W - 1) / W;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch * blocks));
  const bool split_batch = batch >= tasks;
  std::vector<std::vector<T>> part_A(tasks), part_D(tasks), part_b(tasks), part_BC(tasks);
  std::fill(dB, dB + batch * N * L, T(0));
  std::fill(dC, dC + batch * N * L, T(0));
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    Work<T> work(k.scan_work(L, N)), dBC(2 * L * N * W);
    for (int64_t task = task_begin; task < task_end; ++task) {
      part_A[task].assign(dim * N, T(0));
      part_D[task].assign(dim, T(0));
      part_b[task].assign(dim, T(0));
      const auto [b0, b1, k0, k1] = task_range(task, tasks, split_batch, batch, blocks);
      if (!split_batch) part_BC[task].assign(2 * batch * N * L, T(0));
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t blk = k0; blk < k1; ++blk)
          k.scan_bwd(p, b, blk * W, work.data(), dout, dlast, g, dBC.data(), part_A[task].data(),
                     part_D[task].data(), part_b[task].data());
        T* dest = split_batch ? dB : part_BC[task].data();
        T* dest_C = split_batch ? dC : part_BC[task].data() + batch * N * L;
        k.scan_flush(L, N, dBC.data(), dest + b * N * L, dest_C + b * N * L);
      }
    }
  });
  std::fill(dA, dA + dim * N, T(0));
  if (dD) std::fill(dD, dD + dim, T(0));
  if (dbias) std::fill(dbias, dbias + dim, T(0));
  for (int64_t task = 0; task < tasks; ++task) {
    if (part_A[task].empty()) continue;
    for (int64_t i = 0; i < dim * N; ++i) dA[i] += part_A[task][i];
    for (int64_t i = 0; i < dim; ++i) {
      if (dD) dD[i] += part_D[task][i];
      if (dbias) dbias[i] += part_b[task][i];
    }
    if (!part_BC[task].empty())
      for (int64_t i = 0; i < batch * N * L; ++i) {
        dB[i] += part_BC[task][i];
        dC[i] += part_BC[task][batch * N * L + i];
      }
  }
}

template <typename T>
bool use_lanes() { return std::is_same_v<T, float> && current_isa() != kScalar; }

void check(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have the compute dtype");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

template <typename T>
ScanArgs<T> scan_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                      const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                      const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                      bool delta_softplus) {
  ScanArgs<T> p;
  p.u = u.data_ptr<T>(); p.delta = delta.data_ptr<T>(); p.A = A.data_ptr<T>();
  p.B = B.data_ptr<T>(); p.C = C.data_ptr<T>();
  p.D = D.has_value() ? D->data_ptr<T>() : nullptr;
  p.z = z.has_value() ? z->data_ptr<T>() : nullptr;
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<T>() : nullptr;
  p.batch = u.size(0); p.dim = u.size(1); p.L = u.size(2); p.N = A.size(1);
  p.softplus = delta_softplus;
  return p;
}

void check_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                const c10::optional<at::Tensor>& delta_bias) {
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "compute dtype must be float32 or float64");
  check(u, "u", dtype);
  check(delta, "delta", dtype);
  check(A, "A", dtype);
  check(B, "B", dtype);
  check(C, "C", dtype);
  if (D.has_value()) check(*D, "D", dtype);
  if (z.has_value()) check(*z, "z", dtype);
  if (delta_bias.has_value()) check(*delta_bias, "delta_bias", dtype);
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must be (batch, dim, L)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "A must be (dim, N)");
  TORCH_CHECK(A.size(1) >= 1 && A.size(1) <= kMaxN, "N (A.shape[1]) must be in 1..", kMaxN);
  TORCH_CHECK(B.dim() == 3 && B.size(0) == u.size(0) && B.size(1) == A.size(1) && B.size(2) == u.size(2),
              "B must be (batch, N, L)");
  TORCH_CHECK(C.sizes() == B.sizes(), "C must be (batch, N, L)");
}

}  // namespace

// Returns (out, last_state); last_state is empty unless requested.
std::vector<at::Tensor> selective_scan_fwd(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B,
                                              at::Tensor C, c10::optional<at::Tensor> D,
                                              c10::optional<at::Tensor> z, c10::optional<at::Tensor> delta_bias,
                                              bool delta_softplus, bool return_last_state) {
  RECORD_FUNCTION("dmclip::scan_fwd", std::vector<c10::IValue>());
  check_scan(u, delta, A, B, C, D, z, delta_bias);
  auto out = at::empty_like(u);
  auto last = at::empty({return_last_state ? u.size(0) : 0, u.size(1), A.size(1)}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
    auto p = scan_args<scalar_t>(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
    scalar_t* last_ptr = return_last_state ? last.data_ptr<scalar_t>() : nullptr;
    if (use_lanes<scalar_t>()) lanes_forward(p, out.data_ptr<scalar_t>(), last_ptr);
    else scalar_forward(p, out.data_ptr<scalar_t>(), last_ptr);
  });
  return {out, last};
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); the optional ones are empty when not given.
std::vector<at::Tensor> selective_scan_bwd(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B,
                                              at::Tensor C, c10::optional<at::Tensor> D,
                                              c10::optional<at::Tensor> z, c10::optional<at::Tensor> delta_bias,
                                              bool delta_softplus, at::Tensor dout,
                                              c10::optional<at::Tensor> dlast) {
  RECORD_FUNCTION("dmclip::scan_bwd", std::vector<c10::IValue>());
  check_scan(u, delta, A, B, C, D, z, delta_bias);
  check(dout, "dout", u.scalar_type());
  TORCH_CHECK(dout.sizes() == u.sizes(), "dout must be (batch, dim, L)");
  if (dlast.has_value()) {
    check(*dlast, "dlast_state", u.scalar_type());
    TORCH_CHECK(dlast->dim() == 3 && dlast->size(0) == u.size(0) && dlast->size(1) == u.size(1) &&
                dlast->size(2) == A.size(1), "dlast_state must be (batch, dim, N)");
  }
  auto du = at::empty_like(u);
  auto ddelta = at::empty_like(u);
  auto dA = at::empty_like(A);
  auto dB = at::empty_like(B);
  auto dC = at::empty_like(C);
  auto empty = at::empty({0}, u.options());
  auto dD = D.has_value() ? at::empty_like(*D) : empty;
  auto dz = z.has_value() ? at::empty_like(*z) : empty;
  auto dbias = delta_bias.has_value() ? at::empty_like(*delta_bias) : empty;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_bwd", [&] {
    auto p = scan_args<scalar_t>(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
    ScanGrads<scalar_t> g{du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(),
                          z.has_value() ? dz.data_ptr<scalar_t>() : nullptr};
    const scalar_t* dlast_ptr = dlast.has_value() ? dlast->data_ptr<scalar_t>() : nullptr;
    scalar_t* dD_ptr = D.has_value() ? dD.data_ptr<scalar_t>() : nullptr;
    scalar_t* dbias_ptr = delta_bias.has_value() ? dbias.data_ptr<scalar_t>() : nullptr;
    if (use_lanes<scalar_t>())
      lanes_backward(p, dout.data_ptr<scalar_t>(), dlast_ptr, g, dA.data_ptr<scalar_t>(), dB.data_ptr<scalar_t>(),
                     dC.data_ptr<scalar_t>(), dD_ptr, dbias_ptr);
    else
      scalar_backward(p, dout.data_ptr<scalar_t>(), dlast_ptr, g, dA.data_ptr<scalar_t>(), dB.data_ptr<scalar_t>(),
                      dC.data_ptr<scalar_t>(), dD_ptr, dbias_ptr);
  });
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

// The instruction set the kernels run with: "avx512", "avx2" or "scalar".
std::string isa_name() { return kIsaNames[current_isa()]; }

static std::vector<std::string> isas_from(int best) {
  std::vector<std::string> names;
  for (int level = best; level >= 0; --level) names.push_back(kIsaNames[level]);
  return names;
}

// The instruction sets this CPU can run, best first.
std::vector<std::string> supported_isas() { return isas_from(best_isa()); }

// The instruction sets this build has, best first (only "scalar" off x86-64 or with DMCLIP_SCAN_NO_SIMD).
std::vector<std::string> compiled_isas() { return isas_from(best_compiled_isa()); }

// Whether at::parallel_for can use more than the calling thread in this build (see the top of the file).
bool threaded() {
#ifdef INTRA_OP_PARALLEL
  return true;
#else
  return false;
#endif
}

// Force an instruction set ("auto": the best this CPU has); returns the setting before ("auto" or a name).
std::string set_isa(const std::string& name) {
  int level = -1;
  for (int k = 0; k < 3; ++k)
    if (name == kIsaNames[k]) level = k;
  TORCH_CHECK(name == "auto" || level >= 0, "unknown instruction set '", name, "' (auto, avx512, avx2, scalar)");
  TORCH_CHECK(level <= best_compiled_isa(), "this build has no ", name,
              " kernels (built for a CPU other than x86-64, or with DMCLIP_SCAN_NO_SIMD=1)");
  TORCH_CHECK(level <= best_isa(), "this CPU cannot run the ", name, " kernels (best: ", kIsaNames[best_isa()], ")");
  const int before = forced_isa.exchange(level);
  return before < 0 ? "auto" : kIsaNames[before];
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
// the lane kernels take W neighbouring channels per item. Threads split (batch x channel blocks) in the
// forward (batch 1 still uses every core).
namespace {

template <typename T>
void conv_forward(const MixArgs<T>& a, T* xc) {
  RECORD_FUNCTION("dmclip::mixer_conv", std::vector<c10::IValue>());
  const LaneKernels<T>& k = lane_kernels<T>();
  const int64_t W = k.lanes, blocks = (a.E + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, a.L * a.K * W));
  at::parallel_for(0, 2 * a.batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item)
      k.conv_fwd(a, item / (a.batch * blocks), (item / blocks) % a.batch, (item % blocks) * W, xc);
  });
}

// threads own channel blocks, so dw and db need no reduction across threads
template <typename T>
void conv_backward(const MixArgs<T>& a, const T* dxc, T* dx, int64_t dx_stride, T* dw, T* db) {
  RECORD_FUNCTION("dmclip::mixer_conv_bwd", std::vector<c10::IValue>());
  const LaneKernels<T>& k = lane_kernels<T>();
  const int64_t W = k.lanes, blocks = (a.E + W - 1) / W;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    Work<T> work(k.conv_bwd_work(a.L, a.K, end - begin));
    k.conv_bwd(a, begin, end, dxc, dx, dx_stride, dw, db, work.data());
  });
}

template <typename T>
void mixer_scan_forward(const MixArgs<T>& a, T* out) {
  RECORD_FUNCTION("dmclip::mixer_scan", std::vector<c10::IValue>());
  const LaneKernels<T>& k = lane_kernels<T>();
  const int64_t W = k.lanes, blocks = (a.E + W - 1) / W;
  at::parallel_for(0, a.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    Work<T> work(k.mix_fwd_work(a.L));
    for (int64_t item = begin; item < end; ++item)
      k.mix_fwd(a, item / blocks, (item % blocks) * W, out, work.data());
  });
}

// tasks own whole batch rows, or channel blocks when batch < threads; dB, dC, d dt_low of a row are summed
// over channels lane-wise in each task's work buffer and flushed once per (task, row); dA_log, dD, d dt_bias,
// d dt_proj per task, reduced in task order (deterministic for a given thread count)
template <typename T>
void mixer_scan_backward(const MixArgs<T>& a, const T* dout, const MixGrads<T>& g, T* dA_log, T* dD, T* dbias,
                         T* dWdt) {
  RECORD_FUNCTION("dmclip::mixer_scan_bwd", std::vector<c10::IValue>());
  const LaneKernels<T>& k = lane_kernels<T>();
  const int64_t L = a.L, E = a.E, N = a.N, R = a.R, P = a.P(), batch = a.batch, W = k.lanes;
  const int64_t blocks = (E + W - 1) / W;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch * blocks));
  const bool split_batch = batch >= tasks;
  std::vector<std::vector<T>> part_A(tasks), part_D(tasks), part_b(tasks), part_W(tasks), part_BC(tasks);
  std::fill(g.dxdbl, g.dxdbl + 2 * batch * L * P, T(0));
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    Work<T> work(k.mix_work(L, N, R));
    for (int64_t task = task_begin; task < task_end; ++task) {
      part_A[task].assign(2 * E * N, T(0));
      part_D[task].assign(2 * E, T(0));
      part_b[task].assign(2 * E, T(0));
      part_W[task].assign(2 * E * R, T(0));
      const auto [b0, b1, k0, k1] = task_range(task, tasks, split_batch, batch, blocks);
      if (!split_batch) part_BC[task].assign(2 * batch * L * P, T(0));
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t blk = k0; blk < k1; ++blk)
          k.mix_bwd(a, b, blk * W, dout, work.data(), g, part_A[task].data(), part_D[task].data(),
                    part_b[task].data(), part_W[task].data());
        T* base = split_batch ? g.dxdbl : part_BC[task].data();
        k.mix_flush(a, work.data(), base + b * L * P, base + (batch + b) * L * P);
      }
    }
  });
  std::fill(dA_log, dA_log + 2 * E * N, T(0));
  std::fill(dD, dD + 2 * E, T(0));
  std::fill(dbias, dbias + 2 * E, T(0));
  std::fill(dWdt, dWdt + 2 * E * R, T(0));
  for (int64_t task = 0; task < tasks; ++task) {  // fixed order: deterministic for a given thread count
    if (part_A[task].empty()) continue;
    for (int64_t i = 0; i < 2 * E * N; ++i) dA_log[i] += part_A[task][i];
    for (int64_t i = 0; i < 2 * E; ++i) { dD[i] += part_D[task][i]; dbias[i] += part_b[task][i]; }
    for (int64_t i = 0; i < 2 * E * R; ++i) dWdt[i] += part_W[task][i];
    if (!part_BC[task].empty())
      for (int64_t i = 0; i < 2 * batch * L * P; ++i) g.dxdbl[i] += part_BC[task][i];
  }
}

template <typename T>
void rmsnorm(const T* x, const T* w, T eps, int64_t rows, int64_t D, T* y) {
  RECORD_FUNCTION("dmclip::rmsnorm", std::vector<c10::IValue>());
  const LaneKernels<T>& k = lane_kernels<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { k.rmsnorm(x, w, eps, begin, end, D, y); });
}

// rows split into one task per thread, each with its own dw partial, reduced in task order: deterministic for a
// given thread count
template <typename T>
void rmsnorm_backward(const T* x, const T* w, T eps, const T* dy, int64_t rows, int64_t D, T* dx, T* dw) {
  RECORD_FUNCTION("dmclip::rmsnorm_bwd", std::vector<c10::IValue>());
  const LaneKernels<T>& k = lane_kernels<T>();
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  std::vector<std::vector<T>> parts(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      parts[task].assign(D, T(0));
      k.rmsnorm_bwd(x, w, eps, dy, rows * task / tasks, rows * (task + 1) / tasks, D, dx, parts[task].data());
    }
  });
  std::fill(dw, dw + D, T(0));
  for (const auto& part : parts)
    for (int64_t i = 0; i < D; ++i) dw[i] += part[i];
}

void check_param(const at::Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
  check(t, name, dtype);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has shape ", t.sizes(), ", expected ", shape);
}

template <typename T>
MixArgs<T> make_args(const at::Tensor& xz, const at::Tensor& conv_w, const at::Tensor& conv_b,
                     const at::Tensor& dtproj_w, const at::Tensor& dt_bias, const at::Tensor& A_log,
                     const c10::optional<at::Tensor>& D) {
  MixArgs<T> a{};
  a.batch = xz.size(0); a.L = xz.size(1); a.E = xz.size(2) / 2;
  a.N = A_log.size(2); a.R = dtproj_w.size(2); a.K = conv_w.size(2);
  a.xz = xz.data_ptr<T>(); a.conv_w = conv_w.data_ptr<T>(); a.conv_b = conv_b.data_ptr<T>();
  a.A_log = A_log.data_ptr<T>(); a.dt_bias = dt_bias.data_ptr<T>(); a.dtproj_w = dtproj_w.data_ptr<T>();
  a.D = D.has_value() ? D->data_ptr<T>() : nullptr;
  return a;
}

void check_inputs(const at::Tensor& xz, const at::Tensor& conv_w, const at::Tensor& conv_b,
                  const at::Tensor& xproj_w, const at::Tensor& dtproj_w, const at::Tensor& dt_bias,
                  const at::Tensor& A_log, const c10::optional<at::Tensor>& D) {
  const auto dtype = xz.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "compute dtype must be float32 or float64");
  check(xz, "xz", dtype);
  TORCH_CHECK(xz.dim() == 3 && xz.size(2) % 2 == 0, "xz must be (batch, L, 2E)");
  const int64_t E = xz.size(2) / 2, N = A_log.size(-1), R = dtproj_w.size(-1), K = conv_w.size(-1);
  TORCH_CHECK(N >= 1 && N <= kMaxN, "d_state must be in 1..", kMaxN);
  TORCH_CHECK(K >= 1 && K <= kMaxK, "d_conv must be in 1..", kMaxK);
  TORCH_CHECK(R >= 1 && R <= kMaxR, "dt_rank must be in 1..", kMaxR);
  check_param(conv_w, "conv_weight", dtype, {2, E, K});
  check_param(conv_b, "conv_bias", dtype, {2, E});
  check_param(xproj_w, "x_proj_weight", dtype, {2, R + 2 * N, E});
  check_param(dtproj_w, "dt_proj_weight", dtype, {2, E, R});
  check_param(dt_bias, "dt_proj_bias", dtype, {2, E});
  check_param(A_log, "A_log", dtype, {2, E, N});
  if (D.has_value()) check_param(*D, "D", dtype, {2, E});
}

}  // namespace

// Returns (out, xc, xdbl); the last two are what the backward needs.
// bimamba_fwd's computation into given tensors: xc (2, batch, L, E), xdbl (2, batch L, R + 2N), out (batch, L, E)
void bimamba_fwd_into(const at::Tensor& xz, const at::Tensor& conv_w, const at::Tensor& conv_b,
                      const at::Tensor& xproj_w, const at::Tensor& dtproj_w, const at::Tensor& dt_bias,
                      const at::Tensor& A_log, const c10::optional<at::Tensor>& D, at::Tensor& xc, at::Tensor& xdbl,
                      at::Tensor& out) {
  const int64_t batch = xz.size(0), L = xz.size(1), E = xz.size(2) / 2;
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "bimamba_fwd", [&] {
    auto a = make_args<scalar_t>(xz, conv_w, conv_b, dtproj_w, dt_bias, A_log, D);
    conv_forward(a, xc.data_ptr<scalar_t>());
    at::bmm_out(xdbl, xc.view({2, batch * L, E}), xproj_w.transpose(1, 2));  // (2, batch L, R + 2N)
    a.xc = xc.data_ptr<scalar_t>(); a.xdbl = xdbl.data_ptr<scalar_t>();  // dt_proj runs inside the scan
    mixer_scan_forward(a, out.data_ptr<scalar_t>());
  });
}

std::vector<at::Tensor> bimamba_fwd(at::Tensor xz, at::Tensor conv_w, at::Tensor conv_b,
                                       at::Tensor xproj_w, at::Tensor dtproj_w, at::Tensor dt_bias,
                                       at::Tensor A_log, c10::optional<at::Tensor> D) {
  check_inputs(xz, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D);
  const int64_t batch = xz.size(0), L = xz.size(1), E = xz.size(2) / 2;
  auto xc = at::empty({2, batch, L, E}, xz.options());
  auto out = at::empty({batch, L, E}, xz.options());
  auto xdbl = at::empty({2, batch * L, xproj_w.size(1)}, xz.options());
  bimamba_fwd_into(xz, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D, xc, xdbl, out);
  return {out, xc, xdbl};
}

// Returns (dxz, dconv_w, dconv_b, dxproj_w, ddtproj_w, ddt_bias, dA_log, dD).
std::vector<at::Tensor> bimamba_bwd(at::Tensor xz, at::Tensor conv_w, at::Tensor conv_b,
                                       at::Tensor xproj_w, at::Tensor dtproj_w, at::Tensor dt_bias,
                                       at::Tensor A_log, c10::optional<at::Tensor> D, at::Tensor xc,
                                       at::Tensor xdbl, at::Tensor dout) {
  check_inputs(xz, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D);
  const int64_t batch = xz.size(0), L = xz.size(1), E = xz.size(2) / 2, R = dtproj_w.size(2);
  const int64_t N = A_log.size(2), P = R + 2 * N;
  check(dout, "dout", xz.scalar_type());
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({batch, L, E}), "dout must be (batch, L, E)");
  check(xc, "xc", xz.scalar_type());
  check(xdbl, "xdbl", xz.scalar_type());
  auto dxc = at::empty({2, batch, L, E}, xz.options());
  auto dxdbl = at::empty({2, batch * L, P}, xz.options());
  auto dxz = at::empty({batch, L, 2 * E}, xz.options());  // dx and dz are written into their halves
  auto dA_log = at::empty_like(A_log);
  auto dD = at::empty({2, E}, xz.options());
  auto dbias = at::empty_like(dt_bias);
  auto ddtproj_w = at::empty_like(dtproj_w);
  auto dconv_w = at::empty_like(conv_w);
  auto dconv_b = at::empty_like(conv_b);
  at::Tensor dxproj_w;
  AT_DISPATCH_FLOATING_TYPES(xz.scalar_type(), "bimamba_bwd", [&] {
    auto a = make_args<scalar_t>(xz, conv_w, conv_b, dtproj_w, dt_bias, A_log, D);
    a.xc = xc.data_ptr<scalar_t>(); a.xdbl = xdbl.data_ptr<scalar_t>();
    MixGrads<scalar_t> g{dxc.data_ptr<scalar_t>(), dxdbl.data_ptr<scalar_t>(), dxz.data_ptr<scalar_t>() + E, 2 * E};
    mixer_scan_backward(a, dout.data_ptr<scalar_t>(), g, dA_log.data_ptr<scalar_t>(), dD.data_ptr<scalar_t>(),
                        dbias.data_ptr<scalar_t>(), ddtproj_w.data_ptr<scalar_t>());
    dxproj_w = at::bmm(dxdbl.transpose(1, 2), xc.view({2, batch * L, E}));  // (2, P, E)
    auto dxc_v = dxc.view({2, batch * L, E});
    dxc_v.baddbmm_(dxdbl, xproj_w);                                        // + dxdbl @ W_x
    conv_backward(a, dxc.data_ptr<scalar_t>(), dxz.data_ptr<scalar_t>(), 2 * E, dconv_w.data_ptr<scalar_t>(),
                  dconv_b.data_ptr<scalar_t>());
  });
  return {dxz, dconv_w, dconv_b, dxproj_w, ddtproj_w, dbias, dA_log, D.has_value() ? dD : at::Tensor()};
}

// RMSNorm over the last dim (torch.nn.functional.rms_norm with a weight): one pass over x.
at::Tensor rmsnorm_fwd(at::Tensor x, at::Tensor w, double eps) {
  check(x, "x", x.scalar_type());
  check(w, "weight", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), "weight must be (x.shape[-1],)");
  auto y = at::empty_like(x);
  const int64_t D = x.size(-1), rows = D > 0 ? x.numel() / D : 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rmsnorm_fwd", [&] {
    rmsnorm<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), static_cast<scalar_t>(eps), rows, D,
                      y.data_ptr<scalar_t>());
  });
  return y;
}

// Returns (dx, dweight) of rmsnorm_fwd for the output gradient dy.
std::vector<at::Tensor> rmsnorm_bwd(at::Tensor x, at::Tensor w, double eps, at::Tensor dy) {
  check(x, "x", x.scalar_type());
  check(w, "weight", x.scalar_type());
  check(dy, "dy", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), "weight must be (x.shape[-1],)");
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have x's shape");
  auto dx = at::empty_like(x);
  auto dw = at::empty_like(w);
  const int64_t D = x.size(-1), rows = D > 0 ? x.numel() / D : 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rmsnorm_bwd", [&] {
    rmsnorm_backward<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), static_cast<scalar_t>(eps),
                               dy.data_ptr<scalar_t>(), rows, D, dx.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>());
  });
  return {dx, dw};
}

// Intermediate tensors of one block's inference. A single block call gets fresh ones; the stack's chunks keep
// one set per thread from call to call, resized in place: the same storage serves every chunk and block, so
// a call touches no fresh pages. (Freshly allocated, glibc gave the MBs of each chunk back to the OS and the
// next chunk faulted them in again: about 2000 page faults per batch-64 call of mamba-nano, ~7 % of its
// time.) A few MB per thread for as long as the thread lives.
struct StackScratch {
  at::Tensor h, xz, xc, xdbl, y, even, odd;
};
StackScratch& stack_scratch() {
  thread_local StackScratch scratch;
  return scratch;
}
at::Tensor& reuse(at::Tensor& t, at::IntArrayRef sizes, const at::Tensor& like) {
  if (!t.defined() || t.scalar_type() != like.scalar_type()) t = at::empty(sizes, like.options());
  else t.resize_(sizes);
  return t;
}

// One Vim block's inference, next = x + out_proj(mixer(in_proj(rmsnorm(x)))) (next: (batch, L, width), not x),
// every intermediate in s; 6 parallel regions.
void block_fwd_into(const at::Tensor& x, const at::Tensor& norm_w, double eps, const at::Tensor& in_w,
                    const at::Tensor& conv_w, const at::Tensor& conv_b, const at::Tensor& xproj_w,
                    const at::Tensor& dtproj_w, const at::Tensor& dt_bias, const at::Tensor& A_log,
                    const c10::optional<at::Tensor>& D, const at::Tensor& out_w, StackScratch& s, at::Tensor& next) {
  check(x, "x", x.scalar_type());
  check(norm_w, "norm weight", x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && norm_w.dim() == 1 && norm_w.size(0) == x.size(2), "x must be (batch, L, width)");
  const int64_t batch = x.size(0), L = x.size(1), width = x.size(2), E = in_w.size(0) / 2;
  at::Tensor& h = reuse(s.h, {batch, L, width}, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bimamba_rmsnorm", [&] {
    rmsnorm<scalar_t>(x.data_ptr<scalar_t>(), norm_w.data_ptr<scalar_t>(), static_cast<scalar_t>(eps), batch * L,
                      width, h.data_ptr<scalar_t>());
  });
  at::Tensor& xz = reuse(s.xz, {batch * L, in_w.size(0)}, x);
  at::mm_out(xz, h.view({batch * L, width}), in_w.t());
  const at::Tensor xz3 = xz.view({batch, L, in_w.size(0)});
  check_inputs(xz3, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D);
  at::Tensor& xc = reuse(s.xc, {2, batch, L, E}, x);
  at::Tensor& xdbl = reuse(s.xdbl, {2, batch * L, xproj_w.size(1)}, x);
  at::Tensor& y = reuse(s.y, {batch, L, E}, x);
  bimamba_fwd_into(xz3, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D, xc, xdbl, y);
  at::Tensor rows = next.view({batch * L, width});
  at::addmm_out(rows, x.view({batch * L, width}), y.view({batch * L, E}), out_w.t());
}

// Inference of one whole Vim block: x + out_proj(mixer(in_proj(rmsnorm(x)))).
at::Tensor bimamba_block_fwd(at::Tensor x, at::Tensor norm_w, double eps, at::Tensor in_w,
                                at::Tensor conv_w, at::Tensor conv_b, at::Tensor xproj_w,
                                at::Tensor dtproj_w, at::Tensor dt_bias, at::Tensor A_log,
                                c10::optional<at::Tensor> D, at::Tensor out_w) {
  StackScratch fresh;
  at::Tensor next = at::empty_like(x);
  block_fwd_into(x, norm_w, eps, in_w, conv_w, conv_b, xproj_w, dtproj_w, dt_bias, A_log, D, out_w, fresh, next);
  return next;
}

// Rows through every block of the stack (params as for bimamba_stack_fwd), in s; returns s.even or s.odd.
at::Tensor stack_chunk(const at::Tensor& x, const std::vector<at::Tensor>& params, double eps, StackScratch& s) {
  at::Tensor cur = x;
  for (size_t k = 0; k < params.size(); k += 10) {
    const c10::optional<at::Tensor> D = params[k + 8].defined() ? c10::optional<at::Tensor>(params[k + 8])
                                                                : c10::nullopt;
    at::Tensor& next = reuse((k / 10) % 2 == 0 ? s.even : s.odd, x.sizes(), x);
    block_fwd_into(cur, params[k], eps, params[k + 1], params[k + 2], params[k + 3], params[k + 4], params[k + 5],
                   params[k + 6], params[k + 7], D, params[k + 9], s, next);
    cur = next;
  }
  return cur;
}

// Inference of a stack of Vim blocks (the encoder's body) in one call. params: 10 tensors per block, in the
// order of bimamba_block_fwd (norm weight, in_proj, conv weight, conv bias, x_proj, dt_proj, dt bias, A_log, D,
// out_proj). With at least two batch rows per thread, each thread runs every block on its own rows, start to
// end: one parallel region for the whole stack instead of six per block. Rows go through the stack in chunks
// whose activations fit the core's L2 (below). With fewer rows, block after block with the work of each op
// split over threads.
at::Tensor bimamba_stack_fwd(at::Tensor x, std::vector<at::Tensor> params, double eps) {
  TORCH_CHECK(!params.empty() && params.size() % 10 == 0, "params must hold 10 tensors per block");
  check(x, "x", x.scalar_type());
  TORCH_CHECK(x.dim() == 3, "x must be (batch, L, width)");
  const int64_t batch = x.size(0), threads = at::get_num_threads();
  // rows per chunk: a chunk's in_proj output (L x 2E per row) about 1 MB, so a chunk's activations stay in
  // the core's L2 from one op to the next instead of streaming through L3 (at batch 64 on one thread of the
  // bench's CPU this alone took the demo student from 52 to 35 ms)
  const int64_t row_bytes = x.size(1) * params[1].size(0) * static_cast<int64_t>(x.element_size());
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, row_bytes));
  auto run_rows = [&](int64_t b0, int64_t b1, at::Tensor& out) {
    for (int64_t c = b0; c < b1; c += chunk) {
      const int64_t c1 = std::min(b1, c + chunk);
      at::Tensor y;
      {
        c10::InferenceMode inference;  // the scratch tensors are inference tensors, resized in place
        y = stack_chunk(x.narrow(0, c, c1 - c), params, eps, stack_scratch());
      }
      out.narrow(0, c, c1 - c).copy_(y);
    }
  };
  if (threads < 2 || batch < 2 * threads) {
    if (batch <= chunk) {  // one chunk: fresh tensors, block after block, each op over every thread
      StackScratch fresh;
      return stack_chunk(x, params, eps, fresh);
    }
    auto out = at::empty_like(x);
    run_rows(0, batch, out);
    return out;
  }
  auto out = at::empty_like(x);
  const at::ThreadLocalState state;  // grad / inference mode of the caller, for the ops the workers run
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t part = begin; part < end; ++part) run_rows(batch * part / threads, batch * (part + 1) / threads, out);
  });
  return out;
}

}  // namespace dmclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dmclip fused selective scan for the CPU";
  m.def("fwd", &dmclip::selective_scan_fwd, "selective scan forward");
  m.def("bwd", &dmclip::selective_scan_bwd, "selective scan backward");
  m.def("bimamba_fwd", &dmclip::bimamba_fwd,
        "Vim bidirectional mixer, inner part (conv, x_proj, dt_proj, both scans, gate)");
  m.def("bimamba_bwd", &dmclip::bimamba_bwd, "gradient of bimamba_fwd");
  m.def("bimamba_block_fwd", &dmclip::bimamba_block_fwd,
        "inference of a whole Vim block (norm, in_proj, mixer, out_proj, residual)");
  // no Python object is touched inside: other Python threads (and a worker thread that ends up dispatching an
  // op to Python) may run meanwhile
  m.def("bimamba_stack_fwd", &dmclip::bimamba_stack_fwd, py::call_guard<py::gil_scoped_release>(),
        "inference of a stack of Vim blocks (one bimamba_block_fwd per block; whole rows per thread at batch >= 2 x threads)");
  m.def("rmsnorm_fwd", &dmclip::rmsnorm_fwd, "RMSNorm over the last dim, with a weight");
  m.def("rmsnorm_bwd", &dmclip::rmsnorm_bwd, "gradient of rmsnorm_fwd: (dx, dweight)");
  m.def("isa", &dmclip::isa_name, "the instruction set the kernels run with");
  m.def("supported_isas", &dmclip::supported_isas, "the instruction sets this CPU can run, best first");
  m.def("compiled_isas", &dmclip::compiled_isas, "the instruction sets compiled into this build, best first");
  m.def("threaded", &dmclip::threaded, "whether the kernels' parallel loops can use more than one thread");
  m.def("set_isa", &dmclip::set_isa, "force an instruction set ('auto': the best); returns the setting before");
}
