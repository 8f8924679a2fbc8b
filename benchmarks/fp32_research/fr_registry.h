// The small C registry every research .so exports, so that run_gpu.py can list the variants of a library
// and call one by index, whatever its family (sm90 3.x or sm80 2.x). Header-only, no CUTLASS.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace fact_ray_research {

// Status codes returned through the C ABI (run_gpu.py maps them to words).
enum : int {
  kOk = 0,
  kCannotImplement = 1,
  kWorkspaceTooSmall = 2,
  kInitFailed = 3,
  kRunFailed = 4,
  kLaunchError = 5,
};

// run(A, B, D, M, N, K, L, promotion, splits, workspace, workspace_bytes, stream); what A, B and K mean
// depends on the family and is described by the variant's meta JSON ("operands").
using RunFn = int (*)(const float*, const float*, float*, int, int, int, int, uint32_t, int, void*, size_t,
                      cudaStream_t);
using WorkspaceFn = size_t (*)(int, int, int, int, uint32_t, int);

struct Variant {
  const char* name;
  const char* meta;    // JSON object: operand format, schedule, tile, knobs
  RunFn run;
  WorkspaceFn workspace;
  int mmas_per_ktile;  // promotion intervals are multiples of this (0: no promotion knob)
  int stages;
};

}  // namespace fact_ray_research

// Each research TU defines `static const fact_ray_research::Variant kVariants[]` and then expands this.
#define FR_EXPORT_REGISTRY()                                                                                \
  extern "C" int fr_num_variants() { return int(sizeof(kVariants) / sizeof(kVariants[0])); }                 \
  extern "C" const char* fr_variant_name(int i) { return kVariants[i].name; }                               \
  extern "C" const char* fr_variant_meta(int i) { return kVariants[i].meta; }                               \
  extern "C" int fr_variant_mmas_per_ktile(int i) { return kVariants[i].mmas_per_ktile; }                   \
  extern "C" int fr_variant_stages(int i) { return kVariants[i].stages; }                                   \
  extern "C" size_t fr_workspace(int i, int M, int N, int K, int L, uint32_t promotion, int splits) {       \
    return kVariants[i].workspace(M, N, K, L, promotion, splits);                                           \
  }                                                                                                         \
  extern "C" int fr_run(int i, const float* A, const float* B, float* D, int M, int N, int K, int L,        \
                        uint32_t promotion, int splits, void* ws, size_t ws_bytes, cudaStream_t stream) {   \
    return kVariants[i].run(A, B, D, M, N, K, L, promotion, splits, ws, ws_bytes, stream);                  \
  }
