// sm90a 3xTF32 over K-concatenated splits, cooperative persistent kernels: the promotion study.
//   stock_*  the stock FP8 two-level mainloop instantiated directly with TF32 operands
//   p1_*     the derived mainloop, production's fr_tf32x3_mainloop.hpp (explicit clear, optional stagger)
//   plain_*  the stock TF32 mainloop, no promotion: the control for cost and error
#include "fr_sm90_tf32x3.cuh"

using namespace cute;
namespace FR = fact_ray_research;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Persistent = cutlass::gemm::PersistentScheduler;
using C1 = Shape<_1, _1, _1>;
template <class Tile, FR::Mainloop ML>
using CoopCfg = FR::Tf32x3Config<Tile, C1, Coop, CoopEpi, Persistent, ML>;

#define META(ml, tm, tn, tk) \
  "{\"family\":\"sm90_kcat3\",\"operands\":\"kcat3\",\"mainloop\":\"" ml "\",\"schedule\":\"cooperative\"," \
  "\"tile\":[" #tm "," #tn "," #tk "],\"cluster\":[1,1,1],\"scheduler\":\"persistent\"}"

static const FR::Variant kVariants[] = {
    FR::make_variant<CoopCfg<Shape<_128, _128, _32>, FR::Mainloop::StockFp8>>(
        "stock_c128x128x32", META("stock_fp8", 128, 128, 32)),
    FR::make_variant<CoopCfg<Shape<_128, _128, _32>, FR::Mainloop::Promoted>>(
        "p1_c128x128x32", META("p1", 128, 128, 32)),
    FR::make_variant<CoopCfg<Shape<_128, _128, _32>, FR::Mainloop::PlainTf32>>(
        "plain_c128x128x32", META("plain", 128, 128, 32)),
    FR::make_variant<CoopCfg<Shape<_128, _192, _32>, FR::Mainloop::Promoted>>(
        "p1_c128x192x32", META("p1", 128, 192, 32)),
    FR::make_variant<CoopCfg<Shape<_128, _256, _32>, FR::Mainloop::Promoted>>(
        "p1_c128x256x32", META("p1", 128, 256, 32)),
    FR::make_variant<CoopCfg<Shape<_128, _128, _64>, FR::Mainloop::Promoted>>(
        "p1_c128x128x64", META("p1", 128, 128, 64)),
};

FR_EXPORT_REGISTRY()
