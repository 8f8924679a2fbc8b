// fact-ray: launch choices of CUTLASS 3.x persistent and stream-K tile schedulers, shared by the sm90 GEMM
// (sm90_gemm.cu.in) and SwiGLU (sm90_swiglu.cu.in) translation units; emit.py and swiglu.py paste it after
// fr_common.h. A separate header rather than part of fr_common.h: 2.x and tf32x3 TUs take no launch choices, and
// their text (the key of their build cache) stays as it was.
//
// The choices are run-time arguments of one compiled kernel. Each instance fixes them as compile-time constants
// (fr::Launch) beside a kernel type named by values alone, so a TU holding several launch variants of one tile
// config instantiates the kernel once and exports one entry point per variant.

namespace fr {

// raster 0 heuristic, 1 along M, 2 along N; swizzle 0 keeps CUTLASS's default (1); decomposition 0 heuristic
// (split-K when split_k > 1), 1 stream-K, 2 data-parallel.
template <int Raster, int MaxSwizzle, int Decomposition>
struct Launch {
  static constexpr int kRaster = Raster, kMaxSwizzle = MaxSwizzle, kDecomposition = Decomposition;
};

// Stream-K scheduler arguments carry `splits`; the others do not. Persistent and stream-K ones carry a raster
// order and a swizzle size.
template <class Args, class = void>
struct has_splits : std::false_type {};
template <class Args>
struct has_splits<Args, std::void_t<decltype(std::declval<Args&>().splits)>> : std::true_type {};
template <class Args, class = void>
struct has_raster : std::false_type {};
template <class Args>
struct has_raster<Args, std::void_t<decltype(std::declval<Args&>().raster_order),
                                    decltype(std::declval<Args&>().max_swizzle_size)>> : std::true_type {};

// The tile scheduler's arguments for launch choices `Choice` and a K split of `split_k` (1 = none).
template <class Choice, class SchedulerArgs>
cutlass::Status set_scheduler(SchedulerArgs& s, int split_k) {
  if constexpr (has_raster<SchedulerArgs>::value) {
    using Raster = std::decay_t<decltype(s.raster_order)>;
    if constexpr (Choice::kRaster == 1) s.raster_order = Raster::AlongM;
    if constexpr (Choice::kRaster == 2) s.raster_order = Raster::AlongN;
    if constexpr (Choice::kMaxSwizzle > 0) s.max_swizzle_size = Choice::kMaxSwizzle;
  } else {
    // A config that asks for a raster or swizzle its scheduler cannot take is refused, not silently run as
    // another kernel.
    static_assert(Choice::kRaster == 0 && Choice::kMaxSwizzle == 0, "this tile scheduler has no raster/swizzle");
  }
  if constexpr (has_splits<SchedulerArgs>::value) {
    using Mode = std::decay_t<decltype(s.decomposition_mode)>;
    s.splits = split_k;
    if (split_k > 1) {
      if constexpr (Choice::kDecomposition != 0) return cutlass::Status::kErrorNotSupported;
      s.decomposition_mode = Mode::SplitK;
    } else if constexpr (Choice::kDecomposition == 1) {
      s.decomposition_mode = Mode::StreamK;
    } else if constexpr (Choice::kDecomposition == 2) {
      s.decomposition_mode = Mode::DataParallel;
    } else {
      s.decomposition_mode = Mode::Heuristic;
    }
  } else {
    static_assert(Choice::kDecomposition == 0, "only the stream-K tile scheduler takes a decomposition");
    if (split_k > 1) return cutlass::Status::kErrorNotSupported;
  }
  return cutlass::Status::kSuccess;
}

}  // namespace fr
