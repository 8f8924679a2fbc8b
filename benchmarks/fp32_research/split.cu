// The memory-bound split pass of 3xTF32: x -> (hi, lo), both exactly representable in TF32, written as
// K-concatenated parts so that a plain TF32 GEMM over 3K computes hi*hi + hi*lo + lo*hi.
//
//   input  X: logical [L, R, K] fp32 with element strides (sb, sr, sk); either sk == 1 (K contiguous: A
//             [M,K] row-major, or an nn.Linear weight [N,K]) or sr == 1 (R contiguous: B [K,N] row-major,
//             which this pass transposes)
//   output Y: [L, R, nparts*K] packed; part p holds lo if bit p of lo_mask is set, hi otherwise
//             (A: nparts 3, mask 0b100 -> [hi|hi|lo]; B: nparts 3, mask 0b010 -> [hi|lo|hi]).
//
// hi = rna_tf32(x); lo = rna_tf32(x - hi). x - hi is exact in fp32, so x = hi + lo + O(2^-22 |x|), and the
// tensor core's products of TF32 values are exact; what 3xTF32 drops is lo*lo and lo's own rounding.

#include <cstdint>
#include <cuda_runtime.h>

namespace {

__device__ __forceinline__ float tf32_rna(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
}

__device__ __forceinline__ void split1(float x, float& hi, float& lo) {
  hi = tf32_rna(x);
  lo = tf32_rna(x - hi);
}

// K contiguous: each thread splits 4 consecutive k (one float4 when aligned) of one row; a grid-stride loop
// over all (l, r, quad) so that any R (65536-row activations) fits.
__global__ void split_kcontig(const float* __restrict__ X, float* __restrict__ Y, int L, int R, int K,
                              long long sb, long long sr, int nparts, int lo_mask, bool vec4) {
  const long long quads = (K + 3) / 4;
  const long long total = (long long)L * R * quads;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long q = i % quads;
    const long long lr = i / quads;
    const long long r = lr % R, l = lr / R;
    const float* x = X + l * sb + r * sr;
    float* y = Y + lr * (long long)nparts * K;
    const long long k0 = q * 4;
    if (vec4) {
      float4 v = *reinterpret_cast<const float4*>(x + k0);
      float4 h, o;
      split1(v.x, h.x, o.x); split1(v.y, h.y, o.y); split1(v.z, h.z, o.z); split1(v.w, h.w, o.w);
      for (int p = 0; p < nparts; ++p) {
        *reinterpret_cast<float4*>(y + (long long)p * K + k0) = ((lo_mask >> p) & 1) ? o : h;
      }
    } else {
      for (long long k = k0; k < k0 + 4 && k < K; ++k) {
        float h, o;
        split1(x[k], h, o);
        for (int p = 0; p < nparts; ++p) y[(long long)p * K + k] = ((lo_mask >> p) & 1) ? o : h;
      }
    }
  }
}

// R contiguous (B [K, N] row-major): 32x32 tiles through shared memory so that both the read (along R)
// and the write (along K) are coalesced.
__global__ void split_rcontig(const float* __restrict__ X, float* __restrict__ Y, int R, int K, long long sb,
                              long long sk, int nparts, int lo_mask) {
  __shared__ float tile[32][33];
  const int l = blockIdx.z;
  const int r0 = blockIdx.x * 32, k0 = blockIdx.y * 32;
  const float* x = X + l * sb;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    int k = k0 + i, r = r0 + threadIdx.x;
    tile[i][threadIdx.x] = (k < K && r < R) ? x[(long long)k * sk + r] : 0.f;
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    int r = r0 + i, k = k0 + threadIdx.x;
    if (r < R && k < K) {
      float h, o;
      split1(tile[threadIdx.x][i], h, o);
      float* y = Y + ((long long)l * R + r) * (long long)nparts * K + k;
      for (int p = 0; p < nparts; ++p) y[(long long)p * K] = ((lo_mask >> p) & 1) ? o : h;
    }
  }
}

}  // namespace

// Returns 0 on success, 1 for a layout this pass does not handle, 5 for a launch error.
extern "C" int fr_split(const float* X, float* Y, int L, int R, int K, long long sb, long long sr, long long sk,
                        int nparts, int lo_mask, cudaStream_t stream) {
  if (L <= 0 || R <= 0 || K <= 0 || nparts < 1 || nparts > 8) return 1;
  if (L > 65535) return 1;
  if (sk == 1) {
    bool vec4 = (K % 4 == 0) && (sr % 4 == 0) && (sb % 4 == 0) &&
                (reinterpret_cast<uintptr_t>(X) % 16 == 0) && (reinterpret_cast<uintptr_t>(Y) % 16 == 0);
    const int threads = 256;
    long long total = (long long)L * R * ((K + 3) / 4);
    long long blocks = (total + threads - 1) / threads;
    if (blocks > 132LL * 64) blocks = 132LL * 64;   // grid-stride beyond a few waves
    split_kcontig<<<(unsigned)blocks, threads, 0, stream>>>(X, Y, L, R, K, sb, sr, nparts, lo_mask, vec4);
  } else if (sr == 1) {
    if ((K + 31) / 32 > 65535) return 1;
    dim3 grid((unsigned)((R + 31) / 32), (unsigned)((K + 31) / 32), (unsigned)L);
    split_rcontig<<<grid, dim3(32, 8), 0, stream>>>(X, Y, R, K, sb, sk, nparts, lo_mask);
  } else {
    return 1;
  }
  return cudaPeekAtLastError() == cudaSuccess ? 0 : 5;
}
