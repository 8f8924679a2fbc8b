// sm90a 3xTF32 over K-concatenated splits with the derived promoted mainloop (fr_tf32x3_mainloop.hpp):
// ping-pong, stream-K (needed for 256x256x524288: only 4 output tiles) and a 2x1 cluster (TMA multicast).
#include "fr_sm90_tf32x3.cuh"

using namespace cute;
namespace FR = fact_ray_research;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingpongEpi = cutlass::epilogue::TmaWarpSpecialized;
using Persistent = cutlass::gemm::PersistentScheduler;
using StreamK = cutlass::gemm::StreamKScheduler;
using C1 = Shape<_1, _1, _1>;
using C21 = Shape<_2, _1, _1>;
constexpr auto P = FR::Mainloop::Promoted;

#define META(sched, tm, tn, tk, cl, sc) \
  "{\"family\":\"sm90_kcat3\",\"operands\":\"kcat3\",\"mainloop\":\"p1\",\"schedule\":\"" sched "\"," \
  "\"tile\":[" #tm "," #tn "," #tk "],\"cluster\":[" cl "],\"scheduler\":\"" sc "\"}"

static const FR::Variant kVariants[] = {
    FR::make_variant<FR::Tf32x3Config<Shape<_64, _128, _32>, C1, Pingpong, PingpongEpi, Persistent, P>>(
        "p1_pp64x128x32", META("pingpong", 64, 128, 32, "1,1,1", "persistent")),
    FR::make_variant<FR::Tf32x3Config<Shape<_128, _128, _32>, C1, Coop, CoopEpi, StreamK, P>>(
        "p1_c128x128x32_sk", META("cooperative", 128, 128, 32, "1,1,1", "streamk")),
    FR::make_variant<FR::Tf32x3Config<Shape<_128, _128, _32>, C21, Coop, CoopEpi, Persistent, P>>(
        "p1_c128x128x32_cl2x1", META("cooperative", 128, 128, 32, "2,1,1", "persistent")),
};

FR_EXPORT_REGISTRY()
