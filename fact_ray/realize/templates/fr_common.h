// fact-ray: C++ helpers shared by every emitted translation unit (2.x and 3.x alike).
// emit.py pastes this file, after fr_abi.h, into each TU so that a Source is self-contained and its text is
// the whole input of the build cache key.
#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

namespace fr {

// The epilogue of a configuration, as emit.py numbers them (KernelConfig.epilogue).
enum EpilogueKind : int { kNone = 0, kBias = 1, kBiasAct = 2, kBiasResidual = 3, kAct = 4, kResidual = 5 };

constexpr bool needs_bias(int kind) { return kind == kBias || kind == kBiasAct || kind == kBiasResidual; }
constexpr bool needs_c(int kind) { return kind == kBiasResidual || kind == kResidual; }

inline int to_int(cutlass::Status s) { return static_cast<int>(s); }

// Checks that every configuration makes before CUTLASS sees the arguments: a bad call from Python must come
// back as a status, never as a crash or an out-of-bounds launch.
inline cutlass::Status check_args(const fr_gemm_args* a, int kind) {
  if (a == nullptr) return cutlass::Status::kErrorInvalidProblem;
  if (a->M < 1 || a->N < 1 || a->K < 1 || a->L < 1) return cutlass::Status::kErrorInvalidProblem;
  // Both CUTLASS generations keep extents in 32-bit ints (GemmCoord, Shape<int,int,int,int>).
  if (a->M > INT_MAX || a->N > INT_MAX || a->K > INT_MAX || a->L > INT_MAX) {
    return cutlass::Status::kErrorInvalidProblem;
  }
  if (a->A == nullptr || a->B == nullptr || a->D == nullptr) return cutlass::Status::kErrorInvalidProblem;
  if (needs_bias(kind) && a->bias == nullptr) return cutlass::Status::kErrorInvalidProblem;
  if (needs_c(kind) && a->C == nullptr) return cutlass::Status::kErrorInvalidProblem;
  if (a->split_k < 1) return cutlass::Status::kErrorInvalidProblem;
  // A K split and a batch share CUTLASS's batch dimension (2.x) or are untested together (3.x): refuse.
  if (a->split_k > 1 && a->L > 1) return cutlass::Status::kErrorNotSupported;
  if (a->lda < 0 || a->ldb < 0 || a->ldc < 0 || a->ldd < 0) return cutlass::Status::kErrorInvalidProblem;
  return cutlass::Status::kSuccess;
}

// SM count of the current device, queried once per device: persistent 3.x kernels would otherwise query it on
// every initialize().
inline int sm_count(const fr_gemm_args* a) {
  if (a->sm_count > 0) return a->sm_count;
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (dev >= 0 && dev < 64) {
    int n = cache[dev].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

inline int device_id() {
  int dev = 0;
  cudaGetDevice(&dev);
  return dev;
}

// A typed device pointer from the ABI's void pointers (CUTLASS argument structs differ in constness).
template <class Ptr>
Ptr ptr_cast(const void* p) {
  return (Ptr)(const_cast<void*>(p));
}

// Workspace bytes for arguments that make_args accepted; 0 when it refused them (run reports the reason).
template <class Gemm>
size_t workspace_bytes(cutlass::Status made, typename Gemm::Arguments const& args) {
  if (made != cutlass::Status::kSuccess) return 0;
  return Gemm::get_workspace_size(args);
}

template <class Gemm>
int can_implement(cutlass::Status made, typename Gemm::Arguments const& args) {
  if (made != cutlass::Status::kSuccess) return to_int(made);
  return to_int(Gemm::can_implement(args));
}

// can_implement, workspace check, initialize (sets smem attributes, TMA descriptors, zero-fills the workspace on
// the stream), launch. Never synchronizes and never allocates.
template <class Gemm>
int run(cutlass::Status made, typename Gemm::Arguments const& args, const fr_gemm_args* a) {
  if (made != cutlass::Status::kSuccess) return to_int(made);
  cutlass::Status s = Gemm::can_implement(args);
  if (s != cutlass::Status::kSuccess) return to_int(s);
  size_t need = Gemm::get_workspace_size(args);
  if (need > 0 && (a->workspace == nullptr || a->workspace_size < need)) {
    return to_int(cutlass::Status::kErrorWorkspaceNull);
  }
  auto stream = static_cast<cudaStream_t>(a->stream);
  Gemm gemm;
  s = gemm.initialize(args, need > 0 ? a->workspace : nullptr, stream);
  if (s != cutlass::Status::kSuccess) return to_int(s);
  return to_int(gemm.run(stream));
}

}  // namespace fr
