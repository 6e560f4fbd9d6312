// Shared by the torch bindings (selective_scan.cpp): the argument structs, the lane kernels compiled once per
// instruction set (scan_lanes.h), the runtime choice between them, and an aligned scratch buffer. No torch
// headers, so the kernels can also be compiled and checked on their own.
//
// Portability: the AVX-512 and AVX2 copies exist only where the target is x86-64 and the compiler is GCC or
// Clang (their target pragmas); everywhere else (arm64, ...) and in a build with DMCLIP_SCAN_NO_SIMD=1 (CI
// builds one on x86-64 to test the code every other CPU runs) only the portable copy and the scalar loops.
#pragma once

#if (defined(__x86_64__) || defined(__amd64__)) && defined(__GNUC__) && !DMCLIP_SCAN_NO_SIMD
#define DMCLIP_X86_SIMD 1
#include <immintrin.h>
#else
#define DMCLIP_X86_SIMD 0
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

// the vector helpers the kernels' inner loops call per step: left to its heuristics GCC kept some of them (and
// the state update, whose states then went through memory every step) as calls
#define DMCLIP_INLINE inline __attribute__((always_inline))

namespace dmclip {

constexpr int kMaxN = 256;  // state size limit
constexpr int kMaxR = 256;  // dt_rank limit (mixer)
constexpr int kMaxK = 64;   // d_conv limit (mixer)

template <typename T>
struct ScanArgs {
  const T* u; const T* delta; const T* A; const T* B; const T* C;
  const T* D; const T* z; const T* delta_bias;  // optional: null
  int64_t batch, dim, L, N;
  bool softplus;
};

template <typename T>
struct ScanGrads { T* du; T* ddelta; T* dz; };

template <typename T>
struct MixArgs {
  const T* xz; const T* conv_w; const T* conv_b; const T* A_log; const T* D; const T* dt_bias;
  const T* xc; const T* xdbl; const T* dtproj_w;
  int64_t batch, L, E, N, R, K;
  int64_t P() const { return R + 2 * N; }
};

template <typename T>
struct MixGrads { T* dxc; T* dxdbl; T* dz; int64_t dz_stride; };

}  // namespace dmclip

// vectors wider than the baseline ABI's passed by value between inline functions: GCC's note about the ABI
// change is about calls across translation units, which these are not
#if defined(__clang__)
#if __has_warning("-Wpsabi")
#pragma clang diagnostic ignored "-Wpsabi"
#endif
#elif defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if DMCLIP_X86_SIMD
// Each copy inside a region that compiles its functions for the instruction set: GCC's target pragma, or the
// same attribute on every function with Clang (which has no target pragma)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
#endif
#define DMCLIP_ISA_NS isa_avx512
#define DMCLIP_LANES 16
#define DMCLIP_AVX512 1
#define DMCLIP_AVX2 1
namespace dmclip {
#include "scan_lanes.h"
}
#undef DMCLIP_ISA_NS
#undef DMCLIP_LANES
#undef DMCLIP_AVX512
#undef DMCLIP_AVX2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define DMCLIP_ISA_NS isa_avx2
#define DMCLIP_LANES 8
#define DMCLIP_AVX512 0
#define DMCLIP_AVX2 1
namespace dmclip {
#include "scan_lanes.h"
}
#undef DMCLIP_ISA_NS
#undef DMCLIP_LANES
#undef DMCLIP_AVX512
#undef DMCLIP_AVX2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // DMCLIP_X86_SIMD

#define DMCLIP_ISA_NS isa_base
#define DMCLIP_LANES 8
#define DMCLIP_AVX512 0
#define DMCLIP_AVX2 0
namespace dmclip {
#include "scan_lanes.h"
}
#undef DMCLIP_ISA_NS
#undef DMCLIP_LANES
#undef DMCLIP_AVX512
#undef DMCLIP_AVX2

namespace dmclip {

// ------------------------------------------------------------------------------- instruction set choice
enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
inline const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

// the best instruction set this CPU runs among those compiled in
inline int best_isa() {
#if DMCLIP_X86_SIMD
  static const int best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return int(kAvx512);
    return avx2 ? int(kAvx2) : int(kScalar);
  }();
  return best;
#else
  return kScalar;
#endif
}

// the instruction sets compiled into this build, best first
inline int best_compiled_isa() { return DMCLIP_X86_SIMD ? kAvx512 : kScalar; }

inline std::atomic<int> forced_isa{-1};  // -1: the best this CPU has

inline int current_isa() {
  const int forced = forced_isa.load();
  return forced >= 0 ? forced : best_isa();
}

// the lane kernels of one instruction set, for element type T
template <typename T>
struct LaneKernels {
  int lanes;
  int64_t (*scan_work)(int64_t, int64_t);
  void (*scan_fwd)(const ScanArgs<T>&, int64_t, int64_t, T*, T*, T*);
  void (*scan_bwd)(const ScanArgs<T>&, int64_t, int64_t, T*, const T*, const T*, const ScanGrads<T>&, T*, T*, T*, T*);
  void (*scan_flush)(int64_t, int64_t, T*, T*, T*);
  void (*conv_fwd)(const MixArgs<T>&, int64_t, int64_t, int64_t, T*);
  int64_t (*conv_bwd_work)(int64_t, int64_t, int64_t);
  void (*conv_bwd)(const MixArgs<T>&, int64_t, int64_t, const T*, T*, int64_t, T*, T*, T*);
  int64_t (*mix_fwd_work)(int64_t);
  void (*mix_fwd)(const MixArgs<T>&, int64_t, int64_t, T*, T*);
  int64_t (*mix_work)(int64_t, int64_t, int64_t);
  void (*mix_bwd)(const MixArgs<T>&, int64_t, int64_t, const T*, T*, const MixGrads<T>&, T*, T*, T*, T*);
  void (*mix_flush)(const MixArgs<T>&, T*, T*, T*);
  void (*rmsnorm)(const T*, const T*, T, int64_t, int64_t, int64_t, T*);
  void (*rmsnorm_bwd)(const T*, const T*, T, const T*, int64_t, int64_t, int64_t, T*, T*);
};

#define DMCLIP_TABLE(NS, T)                                                                                 \
  LaneKernels<T> {                                                                                          \
    NS::W, &NS::scan_work_size, &NS::scan_forward_item<T>, &NS::scan_backward_item<T>, &NS::scan_flush_BC<T>, \
        &NS::conv_forward_item<T>, &NS::conv_backward_work_size, &NS::conv_backward_blocks<T>, &NS::mixer_forward_work_size,               \
        &NS::mixer_forward_item<T>,                                                                          \
        &NS::mixer_work_size, &NS::mixer_backward_item<T>, &NS::mixer_flush_BC<T>, &NS::rmsnorm_rows<T>,      \
        &NS::rmsnorm_backward_rows<T>                                                                        \
  }

template <typename T>
const LaneKernels<T>& lane_kernels(int isa = current_isa()) {
  if constexpr (std::is_same_v<T, double>) {
    static const LaneKernels<double> base = DMCLIP_TABLE(isa_base, double);
    return base;
  } else {
    static const LaneKernels<float> base = DMCLIP_TABLE(isa_base, float);
#if DMCLIP_X86_SIMD
    static const LaneKernels<float> avx512 = DMCLIP_TABLE(isa_avx512, float);
    static const LaneKernels<float> avx2 = DMCLIP_TABLE(isa_avx2, float);
    switch (isa) {
      case kAvx512: return avx512;
      case kAvx2: return avx2;
      default: return base;
    }
#else
    (void)isa;
    return base;
#endif
  }
}

// 64-byte aligned scratch (the lane kernels read it as vectors), zero-filled
template <typename T>
class Work {
 public:
  explicit Work(int64_t count) {
    const size_t bytes = ((std::max<int64_t>(count, 1) * sizeof(T) + 63) / 64) * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
    std::memset(data_, 0, bytes);
  }
  ~Work() { std::free(data_); }
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;
  T* data() const { return data_; }

 private:
  T* data_;
};

}  // namespace dmclip
