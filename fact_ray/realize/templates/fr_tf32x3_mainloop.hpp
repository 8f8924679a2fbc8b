// fact-ray: the sm90a TF32 WGMMA mainloop with two-level accumulation used by sm90_tf32x3.cu.in, pasted into each
// such translation unit by emit.py (so the TU stays self-contained and its text is the whole build-cache input).
// From the fp32 research (benchmarks/fp32_research, measured on an H200), whose prototypes include this file.
//
// Why: a long chain of TF32 WGMMAs into one accumulator is not a plain fp32 sum; over the 3K products of the
// K-concatenated splits it errs ~6e-5 at K = 4096 and ~4e-3 at K = 3 x 524288 (all-positive inputs; round 1),
// far over the fp32 policy's 1e-5. CUTLASS's FP8 mainloop fixes the same defect: the tensor cores accumulate a
// short group of k-tiles into a temporary fragment, which is then added ("promoted") into the real accumulator
// with fp32 FADDs. Nothing in that mainloop is FP8-specific, so it is instantiated with TF32 operands.
//
// This derives from the stock CollectiveMma<MainloopSm90TmaGmmaWarpSpecializedFP8, ...> (load path, shared
// storage, TMA set-up, Arguments with mma_promotion_interval and can_implement are inherited unchanged) and
// replaces only the consumer side, mma():
//   1. the main accumulator is cleared explicitly: the stock one adds into the kernel's fresh, unset registers;
//   2. promotion every `group` k-tiles, with an optional stagger: each promotion drains the warpgroup's WGMMAs,
//      and in a cooperative kernel the two consumer warpgroups then promote half a group apart, so one keeps the
//      tensor cores busy while the other drains (round 1: G=4 staggered, 0.6e-6 error, fastest with G=2).
// Tried and dropped in the research: two alternating temporaries; ptxas 13.0 serializes every WGMMA of such a
// loop (C7514).
//
// Run-time knob: Arguments::mma_promotion_interval counts MMA k-blocks as in the stock mainloop (a multiple of
// TileK / MmaK, which the stock can_implement checks). Bit 30 set means "stagger" (2^30 is a multiple of every
// k-block count, so can_implement still passes); the interval is the value with bit 30 cleared.

// (no #pragma once: emit.py pastes this file once into each translation unit)

#include "cutlass/gemm/collective/sm90_mma_tma_gmma_ss_warpspecialized_fp8.hpp"

namespace fr_tf32x3 {

constexpr uint32_t kStaggerBit = 1u << 30;

template <class StockFp8Mma>
struct PromotedMma : StockFp8Mma {
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

  // One k-tile of WGMMAs stays in flight before its shared-memory stage is released, as in the stock mainloop;
  // Base::mma_tail releases that last stage, so this count must stay 1.
  static_assert(Base::K_PIPE_MMAS == 1, "mma_tail of the base mainloop assumes one k-tile in flight");

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum,
                          int k_tile_count, int thread_idx, TensorStorage& shared_tensors,
                          Params const& mainloop_params) {
    using namespace cute;
    static_assert(is_rmem<FrgTensorC>::value, "C tensor must be rmem resident.");

    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)

    constexpr int MmaWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
    Layout warp_group_thread_layout = make_layout(Int<MmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    int warp_group_idx = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);

    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(warp_group_thread_layout(warp_group_idx));
    Tensor tCsA = thread_mma.partition_A(sA);  // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCsB = thread_mma.partition_B(sB);  // (MMA,MMA_N,MMA_K,PIPE)
    Tensor tCrA = thread_mma.make_fragment_A(tCsA);  // descriptors
    Tensor tCrB = thread_mma.make_fragment_B(tCsB);
    CUTE_STATIC_ASSERT_V(size<1>(tCsA) == size<1>(accum));
    CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<2>(accum));
    constexpr int kBlocks = size<2>(decltype(tCrA){});  // MMAs per k-tile

    // Promotion group in k-tiles (>= 1); the stock can_implement guarantees the divisibility.
    uint32_t const raw = mainloop_params.mma_promotion_interval;
    bool const stagger = (raw & kStaggerBit) != 0 && MmaWarpGroups > 1;
    int const group = max(1, int((raw & ~kStaggerBit) / kBlocks));

    // The kernel hands over unset registers (and reuses them across a persistent CTA's tiles).
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
        cute::gemm(tiled_mma, tCrA(_, _, k_block, read_stage), tCrB(_, _, k_block, read_stage), frag);
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

    // k-tiles already accumulated in the current group; with stagger the second warpgroup starts half a group
    // in, so its first promotion comes early and the two stay out of phase.
    int in_group = stagger ? (warp_group_idx * (group / 2)) % group : 0;
    CUTLASS_PRAGMA_NO_UNROLL
    for (int k = 0; k < k_tile_count; ++k) {
      auto barrier_token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, barrier_token);
      int read_stage = smem_pipe_read.index();
      // A new group overwrites the temporary, and so does the very first k-tile (a staggered warpgroup starts
      // mid-group, but its temporary holds nothing yet).
      issue(temp, read_stage, in_group == 0 || k == 0);
      if (++in_group == group) {
        warpgroup_wait<0>();  // the group is complete; the next one overwrites temp
        promote(temp);
        in_group = 0;
      } else {
        warpgroup_wait<1>();
      }
      if (k > 0) {  // the previous k-tile's WGMMAs are done with their stage
        pipeline.consumer_release(smem_pipe_release);
        ++smem_pipe_release;
      }
      ++smem_pipe_read;
    }
    warpgroup_wait<0>();
    if (in_group > 0 && k_tile_count > 0) { promote(temp); }
  }
};

}  // namespace fr_tf32x3
