// Shared pieces of the sm90a 3xTF32 research prototypes: one GEMM configuration type and its runner; the
// C registry the .so exports is in fr_registry.h.
//
// Operands (K-concatenated TF32-exact splits, written by split.cu):
//   A3 [L, M, K3] row-major (K-major), B3 [L, N, K3] K-major (ColumnMajor B), D [L, M, N] row-major fp32.
//   K3 = 3K; A3 = [Ahi | Ahi | Alo], B3 = [Bhi | Blo | Bhi] along K, so A3 @ B3^T = hi*hi + hi*lo + lo*hi.

#pragma once

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "fr_registry.h"
// The promoted mainloop is production's own (fact_ray/realize/templates; build.py adds that folder to the
// include path), so the research measures the code fact-ray ships and no second copy can drift from it.
#include "fr_tf32x3_mainloop.hpp"

namespace fact_ray_research {

// Which consumer mainloop a configuration uses.
enum class Mainloop { StockFp8 = 0, Promoted = 1, PlainTf32 = 2 };

template <class TileShape_, class ClusterShape_, class KernelSchedule_, class EpilogueSchedule_,
          class SchedulerTag_, Mainloop kMainloop>
struct Tf32x3Config {
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using LayoutA = cutlass::layout::RowMajor;      // A3 [M, K3]
  using LayoutB = cutlass::layout::ColumnMajor;   // B3 stored [N, K3]: K-major, what TF32 WGMMA needs
  using LayoutD = cutlass::layout::RowMajor;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, 4,            // no C source: D = A3 @ B3
      float, LayoutD, 4, EpilogueSchedule_>::CollectiveOp;

  // The stock TF32 builder picks the tiled MMA, shared-memory atoms, TMA atoms and stage count.
  using StockBuilder = cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, float, LayoutA, 4, float, LayoutB, 4, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule_>;
  using StockMma = typename StockBuilder::CollectiveOp;
  static constexpr int Stages = StockMma::DispatchPolicy::Stages;

  // The same pieces under the FP8 two-level-accumulation mainloop, instantiated directly (the builder
  // would only pick it for FP8 inputs).
  using Fp8Policy = cutlass::gemm::MainloopSm90TmaGmmaWarpSpecializedFP8<Stages, ClusterShape, KernelSchedule_>;
  using Fp8Mma = cutlass::gemm::collective::CollectiveMma<
      Fp8Policy, TileShape, float, typename StockMma::StrideA, float, typename StockMma::StrideB,
      typename StockMma::TiledMma,
      typename StockMma::GmemTiledCopyA, typename StockMma::SmemLayoutAtomA, void, cute::identity,
      typename StockMma::GmemTiledCopyB, typename StockMma::SmemLayoutAtomB, void, cute::identity>;

  using CollectiveMainloop =
      std::conditional_t<kMainloop == Mainloop::StockFp8, Fp8Mma,
      std::conditional_t<kMainloop == Mainloop::PlainTf32, StockMma,
      fr_tf32x3::PromotedMma<Fp8Mma>>>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<
      cute::Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, SchedulerTag_>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static constexpr bool kStreamK = std::is_same_v<SchedulerTag_, cutlass::gemm::StreamKScheduler>;
  static constexpr bool kHasPromotion = kMainloop != Mainloop::PlainTf32;
};

inline int sm_count_cached() {
  static int count = -1;
  if (count < 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(dev);
  }
  return count;
}

// splits: < 0 stream-K heuristic, 1 data-parallel, > 1 split-K with that many splits (stream-K kernels
// only; ignored otherwise).
template <class Cfg>
typename Cfg::Gemm::Arguments make_args(const float* A3, const float* B3, float* D, int M, int N, int K3,
                                        int L, uint32_t promotion, int splits) {
  using Gemm = typename Cfg::Gemm;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  StrideA sA = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K3, L));
  StrideB sB = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K3, L));
  StrideC sC = cutlass::make_cute_packed_stride(StrideC{}, cute::make_shape(M, N, L));
  StrideD sD = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, L));

  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = sm_count_cached();

  typename Gemm::Arguments args;
  args.mode = L > 1 ? cutlass::gemm::GemmUniversalMode::kBatched : cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {M, N, K3, L};
  if constexpr (Cfg::kHasPromotion) {
    args.mainloop = {A3, sA, B3, sB, promotion};
  } else {
    args.mainloop = {A3, sA, B3, sB};
  }
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = sC;
  args.epilogue.ptr_D = D;
  args.epilogue.dD = sD;
  args.hw_info = hw;
  if constexpr (Cfg::kStreamK) {
    using Mode = cutlass::gemm::kernel::detail::DecompositionMode;
    if (splits < 0) {
      args.scheduler.decomposition_mode = Mode::Heuristic;
    } else if (splits <= 1) {
      args.scheduler.decomposition_mode = Mode::DataParallel;
    } else {
      args.scheduler.decomposition_mode = Mode::SplitK;
      args.scheduler.splits = splits;
    }
  }
  return args;
}

template <class Cfg>
size_t workspace_bytes(int M, int N, int K3, int L, uint32_t promotion, int splits) {
  auto args = make_args<Cfg>(nullptr, nullptr, nullptr, M, N, K3, L, promotion, splits);
  return Cfg::Gemm::get_workspace_size(args);
}

template <class Cfg>
int run(const float* A3, const float* B3, float* D, int M, int N, int K3, int L, uint32_t promotion,
        int splits, void* workspace, size_t workspace_size, cudaStream_t stream) {
  using Gemm = typename Cfg::Gemm;
  auto args = make_args<Cfg>(A3, B3, D, M, N, K3, L, promotion, splits);
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return kCannotImplement;
  if (Gemm::get_workspace_size(args) > workspace_size) return kWorkspaceTooSmall;
  Gemm gemm;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return kInitFailed;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return kRunFailed;
  if (cudaPeekAtLastError() != cudaSuccess) return kLaunchError;
  return kOk;
}

template <class Cfg>
constexpr int mmas_per_ktile() {
  using TM = typename Cfg::CollectiveMainloop::TiledMma;
  return int(cute::size<2>(typename Cfg::TileShape{})) / int(TM{}.template tile_size_mnk<2>());
}

template <class Cfg>
Variant make_variant(const char* name, const char* meta) {
  return Variant{name, meta, &run<Cfg>, &workspace_bytes<Cfg>, mmas_per_ktile<Cfg>(), Cfg::Stages};
}

}  // namespace fact_ray_research
