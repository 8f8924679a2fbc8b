// fact-ray: the SwiGLU epilogue (pasted into sm90_swiglu TUs by realize/swiglu.py).
//
// The kernel is one GEMM over the row-interleaved weight B' = [Wg[0]; Wu[0]; Wg[1]; Wu[1]; ...] (2F rows of K,
// packed once per weight by the dispatcher), so column 2j of the accumulator tile is the gate of output column j
// and column 2j+1 its up projection. WGMMA keeps two adjacent accumulator columns of one row in one thread's
// consecutive registers (the first value mode of every SM90 C layout), so each thread finishes its own pairs:
//     D[m, j] = silu(acc[m, 2j] + bias[2j]) * (acc[m, 2j+1] + bias[2j+1])
// and the [M, 2F] intermediate never leaves the registers. D is row-major [M, F] (ldd elements between rows).
//
// The interface is that of CUTLASS's DefaultEpilogue (cutlass/epilogue/collective/default_epilogue.hpp), the
// operator-style epilogue the sm90 warp-specialized kernels take through Sm90TmaWarpSpecializedAdapter; no shared
// memory, so the mainloop keeps every stage. A pair whose coordinates are not (m, 2j), (m, 2j+1) is left
// unwritten rather than guessed at: verification against float64 then fails on the poisoned output.
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/dispatch_policy.hpp"

namespace fr_swiglu {

template <class ElementD_>
class SwiGluEpilogue {
 public:
  using EpilogueSchedule = cutlass::gemm::EpilogueDefault;
  using DispatchPolicy = EpilogueSchedule;
  using ElementD = ElementD_;
  using ElementOutput = ElementD_;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using ElementC = void;  // no source operand
  using GmemElementC = ElementD;
  using StrideC = cute::Stride<int64_t, cute::Int<1>, int64_t>;
  using StrideD = StrideC;
  // Never called: GemmUniversalAdapter names the type (EpilogueOutputOp), so it must exist.
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<
      ElementD, 1, float, float, cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling,
      cutlass::FloatRoundStyle::round_to_nearest, ElementD>;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;

  struct SharedStorage {};
  using TensorStorage = SharedStorage;

  struct Arguments {
    ElementD* ptr_D = nullptr;
    int64_t ldd = 0;             // elements between rows of D
    int64_t batch_stride_d = 0;  // elements between batches of D
    ElementD const* ptr_bias = nullptr;  // [2F], interleaved like B's rows, or null
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }

  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }

  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto shape = cute::append<4>(problem_shape, 1);
    const int64_t N = cute::get<1>(shape);
    // An odd column count cannot hold (gate, up) pairs; D rows must hold N / 2 outputs.
    return args.ptr_D != nullptr && N % 2 == 0 && args.ldd >= N / 2;
  }

  CUTLASS_HOST_DEVICE
  SwiGluEpilogue(Params const& params_, SharedStorage const& = SharedStorage()) : params(params_) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators, TiledMma tiled_mma,
                                 ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    const int M = get<0>(problem_shape_mnkl);
    const int N = get<1>(problem_shape_mnkl);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;

    // Absolute (m, n) of every accumulator this thread holds, partitioned exactly as the accumulators are.
    Tensor cD = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_MNK),
                           make_coord(m_coord, n_coord));
    auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
    Tensor tCcD = thr_mma.partition_C(cD);
    CUTE_STATIC_ASSERT_V(size(tCcD) == size(accumulators), "one coordinate per accumulator");

    ElementD* out = params.ptr_D + static_cast<int64_t>(l_coord) * params.batch_stride_d;
    ElementD const* bias = params.ptr_bias;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i + 1 < size(accumulators); i += 2) {
      auto g = tCcD(i);
      auto u = tCcD(i + 1);
      const int m = get<0>(g), n = get<1>(g);
      if (get<0>(u) != m || get<1>(u) != n + 1 || (n & 1) != 0) continue;  // not a (gate, up) pair: see above
      if (m >= M || n + 1 >= N) continue;                                    // past the problem's edge
      float gate = static_cast<float>(accumulators(i));
      float up = static_cast<float>(accumulators(i + 1));
      if (bias != nullptr) {
        gate += static_cast<float>(bias[n]);
        up += static_cast<float>(bias[n + 1]);
      }
      // Fast intrinsics: for a gate below about -87 the denominator overflows and SiLU rounds to 0, as it
      // does within bf16/fp16 output precision anyway.
      const float silu = __fdividef(gate, 1.0f + __expf(-gate));
      out[static_cast<int64_t>(m) * params.ldd + (n >> 1)] = static_cast<ElementD>(silu * up);
    }
  }

 private:
  Params params;
};

}  // namespace fr_swiglu
