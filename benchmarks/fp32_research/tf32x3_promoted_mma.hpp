// A Hopper (sm90a) TF32 WGMMA mainloop with two-level accumulation, for 3xTF32 over K-concatenated splits.
//
// Why: on Hopper the WGMMA accumulator chain is not a plain fp32 add; a long chain of TF32 WGMMAs into one
// accumulator loses precision (measured: 2.7e-5 rel at K=4096, 3.6e-4 at K=3*524288, growing with the chain,
// biased for all-positive inputs). CUTLASS's FP8 mainloop fixes the same defect for FP8 by letting the tensor
// cores accumulate only a short run of k-blocks into a temporary fragment and then adding ("promoting") it
// into the real accumulator with ordinary fp32 FADDs. This file reuses that mainloop for TF32 operands.
//
// It derives from the stock CollectiveMma<MainloopSm90TmaGmmaWarpSpecializedFP8, ...> (whose load path,
// shared storage, TMA set-up, arguments and can_implement are type-generic and are inherited as they are)
// and replaces only the consumer side, mma(), with two differences from the stock one:
//   1. the main accumulator is cleared explicitly (the stock one adds into the kernel's fresh, unset
//      registers and relies on the compiler treating them as zero);
//   2. stagger (runtime): each promotion drains the warpgroup's WGMMAs (warpgroup_wait<0>) before the FADDs;
//      in a cooperative kernel the two consumer warpgroups then promote half a group apart, so that one of
//      them keeps the tensor cores fed while the other drains.
// Tried and dropped: two alternating temporaries so the FADDs of one group overlap the next group's first
// WGMMA batch. ptxas (13.0) serializes every WGMMA of that loop (C7514: "non wgmma instructions reading
// accumulator registers of a wgmma between start and end of the pipeline stage") whenever a loop-carried
// temporary is read while the other one's batch is in flight across the loop back-edge, in every loop
// shape tried (runtime buffer index; one static loop per buffer; an unrolled alternation).
//
// Runtime knob: Arguments::mma_promotion_interval, counted in MMA k-blocks as in the stock mainloop (a
// multiple of TileK / MmaK; the stock can_implement checks it). Bit 30 set means "stagger" (a multiple of
// every k-block count, so can_implement still passes); the interval is the value with bit 30 cleared.

#pragma once

#include "cutlass/gemm/collective/sm90_mma_tma_gmma_ss_warpspecialized_fp8.hpp"

namespace fact_ray_research {

using namespace cute;
using cutlass::NumThreadsPerWarpGroup;

constexpr uint32_t kStaggerBit = 1u << 30;

template <class StockFp8Mma>
struct Tf32x3PromotedMma : StockFp8Mma {
  using Base = StockFp8Mma;
  using typename Base::DispatchPolicy;
  using typename Base::TiledMma;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::Params;
  using typename Base::ElementAccumulator;

  // One k-tile of WGMMAs is kept in flight before its shared-memory stage is released, as in the stock
  // mainloop; Base::mma_tail releases that last stage, so this count must stay 1.
  static_assert(Base::K_PIPE_MMAS == 1, "mma_tail of the base mainloop assumes one k-tile in flight");

  template <class FrgTensorC>
  CUTLASS_DEVICE void
  mma(MainloopPipeline pipeline,
      PipelineState smem_pipe_read,
      FrgTensorC& accum,
      int k_tile_count,
      int thread_idx,
      TensorStorage& shared_tensors,
      Params const& mainloop_params) {
    static_assert(is_rmem<FrgTensorC>::value, "C tensor must be rmem resident.");

    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)

    constexpr int MmaWarpGroups = size(TiledMma{}) / NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<MmaWarpGroups>{}, Int<NumThreadsPerWarpGroup>{});
    int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / NumThreadsPerWarpGroup, 0);

    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCsA = thread_mma.partition_A(sA);                                      // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCsB = thread_mma.partition_B(sB);                                      // (MMA,MMA_N,MMA_K,PIPE)
    Tensor tCrA = thread_mma.make_fragment_A(tCsA);                                // descriptors
    Tensor tCrB = thread_mma.make_fragment_B(tCsB);
    CUTE_STATIC_ASSERT_V(size<1>(tCsA) == size<1>(accum));
    CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<2>(accum));
    constexpr int kBlocks = size<2>(decltype(tCrA){});                             // MMAs per k-tile

    // Promotion group length in k-tiles (>= 1). The stock can_implement guarantees divisibility.
    uint32_t const raw = mainloop_params.mma_promotion_interval;
    bool const stagger = (raw & kStaggerBit) != 0 && MmaWarpGroups > 1;
    int const group = max(1, int((raw & ~kStaggerBit) / kBlocks));

    // Fresh accumulator: the kernel hands us unset registers.
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accum); ++i) { accum(i) = ElementAccumulator(0); }

    auto temp = make_fragment_like(accum);

    PipelineState smem_pipe_release = smem_pipe_read;

    auto issue = [&](auto& frag, int read_stage, bool zero_first) {
      tiled_mma.accumulate_ = zero_first ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
      warpgroup_fence_operand(frag);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < kBlocks; ++k_block) {
        cute::gemm(tiled_mma, tCrA(_,_,k_block,read_stage), tCrB(_,_,k_block,read_stage), frag);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    auto promote = [&](auto& frag) {
      warpgroup_fence_operand(frag);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(accum); ++i) { accum(i) += frag(i); }
      warpgroup_fence_operand(frag);
    };
    // Wait for k-tile k's stage, and after its WGMMAs are issued release k-1's stage.
    auto acquire = [&]() {
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      return smem_pipe_read.index();
    };
    auto advance = [&](int k) {
      if (k > 0) {                      // the previous k-tile's WGMMAs are done with their stage
        pipeline.consumer_release(smem_pipe_release);
        ++smem_pipe_release;
      }
      ++smem_pipe_read;
    };

    // Counts k-tiles already accumulated in the current group; the stagger pre-counts half a group for
    // the second warpgroup so its first promotion comes early and the two stay out of phase.
    int in_group = stagger ? (warp_group_idx * (group / 2)) % group : 0;
    CUTLASS_PRAGMA_NO_UNROLL
    for (int k = 0; k < k_tile_count; ++k) {
      int read_stage = acquire();
      // A new group overwrites the temporary; so does the very first k-tile (with stagger the second
      // warpgroup starts mid-group, but its temporary holds nothing yet).
      issue(temp, read_stage, in_group == 0 || k == 0);
      if (++in_group == group) {
        warpgroup_wait<0>();          // the group is complete; the next group overwrites temp
        promote(temp);
        in_group = 0;
      } else {
        warpgroup_wait<1>();
      }
      advance(k);
    }
    warpgroup_wait<0>();
    if (in_group > 0 && k_tile_count > 0) { promote(temp); }
  }
};

}  // namespace fact_ray_research
