/* fact-ray kernel ABI, version 1.
 *
 * Every translation unit that fact-ray emits exports, for each configuration <sym> it holds:
 *
 *   size_t <sym>_workspace(const fr_gemm_args* a);      bytes of device workspace the call needs
 *   int    <sym>_can_implement(const fr_gemm_args* a);  0 = ok, else a cutlass::Status code
 *   int    <sym>_run(const fr_gemm_args* a);            0 = ok; launches on a->stream; never syncs
 *
 * and once per library `int fr_abi_version(void)` (returns FR_ABI_VERSION).
 *
 * Semantics: D[l] = epilogue(alpha * A[l] @ B[l] (+ beta * C[l]) (+ bias)), per the configuration's epilogue:
 *   none           D = alpha*acc                       (C and bias are ignored)
 *   bias           D = alpha*acc + bias                (C is ignored)
 *   bias_act       D = act(alpha*acc + bias)           (C is ignored)
 *   bias_residual  D = alpha*acc + beta*C + bias       (C is the residual; callers pass beta = 1)
 *   act            D = act(alpha*acc)                  (C and bias are ignored)
 *   residual       D = alpha*acc + beta*C              (C is the residual; callers pass beta = 1; bias ignored)
 * Layouts: A row-major [M,K] (lda = K) or, for a "col" A, stored [K,M] (lda = M); B "col" is stored [N,K]
 * row-major (ldb = K, an nn.Linear weight), B "row" is stored [K,N] (ldb = N); C and D are row-major [M,N].
 * bias is a contiguous [N] vector shared by all batches. Leading dimensions and batch strides count elements;
 * a batch stride of 0 broadcasts that operand over L. split_k > 1 asks for a K split where the configuration
 * has one (serial split-K for 2.x kernels, the stream-K scheduler's split-K mode for 3.x stream-K kernels);
 * other configurations refuse it. sm_count = 0 lets the kernel query the device.
 * _run checks the arguments itself (can_implement, workspace size) and returns a status instead of crashing;
 * it uses the workspace pointer it is given and allocates nothing.
 */
#ifndef FR_ABI_H
#define FR_ABI_H

#include <stddef.h>
#include <stdint.h>

#define FR_ABI_VERSION 1

/* Libraries build with -fvisibility=hidden so that CUTLASS's template code and statics stay private to each
 * library (two libraries in one process never bind to each other's copies); only these entry points export. */
#if defined(__GNUC__)
#define FR_EXPORT __attribute__((visibility("default")))
#else
#define FR_EXPORT
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* A; const void* B; const void* C; void* D; const void* bias;  /* C: residual or NULL; bias: [N] or NULL */
  int64_t M, N, K, L;
  int64_t lda, ldb, ldc, ldd;                       /* leading dimensions in elements, per the config's layouts */
  int64_t batch_stride_a, batch_stride_b, batch_stride_c, batch_stride_d;   /* elements; 0 broadcasts */
  float alpha, beta;
  int32_t split_k;                                  /* 1 = none */
  int32_t sm_count;                                 /* 0 = query */
  void* workspace; size_t workspace_size;
  void* stream;                                     /* cudaStream_t */
} fr_gemm_args;

FR_EXPORT int fr_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* FR_ABI_H */
