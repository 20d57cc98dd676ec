// Kinds 40-43: CUTLASS 3's SM90 mixed-input GEMM (TMA, warp-specialized cooperative schedule, int4 weights widened
// to int8 in registers, int8 wgmma with A from registers) on our prepared int4 layout, with our epilogue as a visitor
// tree; 41-43 with the stream-K tile scheduler. vLLM's CUTLASS W4A8 (the same mainloop, int4 -> fp8) runs
// 1,150-1,460 TOP/s at 2048-8192 tokens on the H100 where our own wgmma kinds 6/26 run ~950
// (benchmarks/results/kernels_h100_vllm.json). Headers: the nvidia-cutlass wheel (build.py finds them). bf16
// output, fp32 weight scales, K % 128 == 0; anything else: cudaErrorNotSupported.
#include <cuda_runtime.h>

#include <type_traits>
#include "cutlass/cutlass.h"
#include "cutlass/numeric_conversion.h"

// Our prepared nibbles: byte j of a word holds (row g, k j) in its high nibble and (row g + 8, k j) in its low one
// (layout.py). CuTe is told the K-major order (i0 + 4 h): bytes travel whole (TMA, shared memory) and a thread
// gets back the same 32-bit words in the same registers, so the converter, which knows the true order, widens them
// with our two ops a word (to 16 w; the epilogue shifts the int32 sum back). The only converter of this kind in
// this translation unit.
namespace cutlass {
template <>
struct NumericArrayConverter<int8_t, int4b_t, 8, FloatRoundStyle::round_to_nearest> {
  using result_type = Array<int8_t, 8>;
  using source_type = Array<int4b_t, 8>;
  CUTLASS_HOST_DEVICE static result_type convert(source_type const& s) {
    unsigned const w = reinterpret_cast<unsigned const&>(s);
    unsigned out[2] = {w & 0xF0F0F0F0u, (w << 4) & 0xF0F0F0F0u};
    return reinterpret_cast<result_type const&>(out);
  }
  CUTLASS_HOST_DEVICE result_type operator()(source_type const& s) const { return convert(s); }
};
}  // namespace cutlass

#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

// A = weights [N_out, K] (GEMM M = output channels), int4, our prepared layout in nibbles:
//   m % 16 = g + 8 h, k % 64 = i0 + 4 t + 16 wsel + 32 s; offset = ((m/16) K/64 + k/64) 1024 + (4 g + t) 32 + 16 s
//   + 8 wsel + 4 h + i0
using LayoutA = Layout<Shape<Shape<_8, _2, int>, Shape<_4, _4, _2, _2, int>, int>,
                       Stride<Stride<_128, _4, int64_t>, Stride<_1, _32, _8, _16, _1024>, int64_t>>;
using ElementA = cutlass::int4b_t;
using ElementB = int8_t;                       // activations [M_tok, K], K-major: B column-major
using LayoutB = cutlass::layout::ColumnMajor;
using ElementD = cutlass::bfloat16_t;
using LayoutD = cutlass::layout::ColumnMajor;  // D[n_out, m_tok] column-major = out[m_tok][n_out]
using ClusterShape = Shape<_1, _1, _1>;

// Epilogue (visitor tree), in CUTLASS's view: rows = output channels n, columns = tokens m:
//   D = (a_scale[m] * w_scale[n]) * float((acc >> 4) - a_zero[m] * w_sum[n]) -> bf16 (ours: epilogue_value)
template <class T>
struct ShiftRight4 {
  CUTLASS_HOST_DEVICE T operator()(T const& x) const {
    T y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) y[i] = x[i] >> 4;
    return y;
  }
};
namespace fus = cutlass::epilogue::fusion;
using RN = cutlass::FloatRoundStyle;

// One GEMM type a tile shape (weight rows x tokens x k) and tile scheduler: kind 40 persistent data-parallel,
// 128 x 128 x 128 or (from 1024 tokens) 128 x 256 x 128; kinds 41-43 stream-K (K split over the CTAs so that a
// few output tiles still fill the 132 SMs: decode batches) with 64, 128 and 32 tokens a tile.
template <class TileShape, class Scheduler_ = void>
struct Kind40 {
  using Scheduler = Scheduler_;
  using WSum = fus::Sm90ColBroadcast<0, TileShape, int32_t, int32_t, Stride<_1, _0, int64_t>, 4>;
  using WScale = fus::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>, 4>;
  using AZero = fus::Sm90RowBroadcast<0, TileShape, float, int32_t, Stride<_0, _1, int64_t>, 1>;
  using AScale = fus::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>, 1>;
  using Acc16 = fus::Sm90EVT<fus::Sm90Compute<ShiftRight4, int32_t, int32_t, RN::round_to_nearest>, fus::Sm90AccFetch>;
  using ZW = fus::Sm90EVT<fus::Sm90Compute<cutlass::multiplies, int32_t, int32_t, RN::round_to_nearest>, AZero, WSum>;
  using V = fus::Sm90EVT<fus::Sm90Compute<cutlass::minus, float, int32_t, RN::round_to_nearest>, Acc16, ZW>;
  using S = fus::Sm90EVT<fus::Sm90Compute<cutlass::multiplies, float, float, RN::round_to_nearest>, AScale, WScale>;
  using Out = fus::Sm90EVT<fus::Sm90Compute<cutlass::multiplies, ElementD, float, RN::round_to_nearest>, S, V>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, LayoutD, 8, ElementD, LayoutD, 8,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Out>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, 32, ElementB, LayoutB, 16, int32_t,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                          CollectiveEpilogue, Scheduler_>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

// The persistent tile scheduler's order and kind 40's tile (Python: OSTQUANT_CUTLASS_RASTER / _SWIZZLE / _TILE,
// measurement settings; -1: automatic). Raster 0 CUTLASS's heuristic (along the longer tile count), 1 along the
// weight rows, 2 along the tokens; swizzle 1, 2, 4 or 8 tiles of the other dimension together; tile 0: 128 x 128 x
// 128, 1: 128 x 256 x 128. Automatic from 1024 tokens: along the tokens, swizzle 4, 128 x 256 (session 20,
// results/kernels_h100_sched.json: the fastest of 10 settings on all 8 Llama-3 8B / 70B layers at 2048 and 8192
// tokens, 1.0-1.7x faster than CUTLASS's default order); below, CUTLASS's defaults (fewer tiles: 128 x 256 would
// leave SMs idle).
static int g_raster = -1, g_swizzle = -1, g_tile = -1;
extern "C" void ostq_cutlass_set_sched(int raster, int swizzle, int tile) {
  g_raster = raster >= 0 && raster <= 2 ? raster : -1;
  g_swizzle = swizzle == 1 || swizzle == 2 || swizzle == 4 || swizzle == 8 ? swizzle : -1;
  g_tile = tile == 0 || tile == 1 ? tile : -1;
}
static bool many_tokens(int M) { return M >= 1024; }  // kernels.CUTLASS_MANY_TOKENS
static bool wide_tile(int M) { return g_tile >= 0 ? g_tile == 1 : many_tokens(M); }

int ostq_num_sms();  // csrc/ostquant_kernels.cu: the current device's SM count, cached

template <class K40>
static typename K40::Gemm::Arguments make_args(const void* w, const void* a, void* d, int M, int N, int K,
                                               const float* a_scale, const float* a_zero, const float* w_scale,
                                               const int* w_sum) {
  using GemmKernel = typename K40::GemmKernel;
  // CUTLASS's GEMM: rows = our N (weights, A), columns = our M (tokens, B), D column-major = out[M][N] row-major
  LayoutA la = make_layout(make_shape(make_shape(_8{}, _2{}, N / 16), make_shape(_4{}, _4{}, _2{}, _2{}, K / 64), 1),
                           make_stride(make_stride(_128{}, _4{}, (int64_t)K * 16),
                                       make_stride(_1{}, _32{}, _8{}, _16{}, _1024{}), (int64_t)N * K));
  using StrideB = typename GemmKernel::StrideB;
  using StrideD = typename GemmKernel::StrideD;
  StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(M, K, 1));
  StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, make_shape(N, M, 1));
  typename K40::Out::Arguments evt{{{a_scale, 0.f, {}}, {w_scale, 0.f, {}}, {}},                // as * ws
                                   {{{}, {}}, {{a_zero, 0.f, {}}, {w_sum, 0, {}}, {}}, {}},   // (acc >> 4) - az * wsum
                                   {}};
  typename K40::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                     {N, M, K, 1},
                                     {static_cast<const ElementA*>(w), la, static_cast<const ElementB*>(a), sb},
                                     {evt, nullptr, sd, static_cast<ElementD*>(d), sd}};
  using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
  const int raster = g_raster >= 0 ? g_raster : many_tokens(M) ? 2 : 0;
  args.scheduler.raster_order = raster == 1 ? Raster::AlongM : raster == 2 ? Raster::AlongN : Raster::Heuristic;
  args.scheduler.max_swizzle_size = g_swizzle > 0 ? g_swizzle : many_tokens(M) ? 4 : 1;
  if constexpr (!std::is_void_v<typename K40::Scheduler>)  // int32 partial sums: any order gives the same sum
    args.scheduler.reduction_mode = cutlass::gemm::kernel::detail::ReductionMode::Nondeterministic;
  // the SMs the work is spread over, asked once (CUTLASS would ask every call, and divide by zero without a GPU)
  args.hw_info.sm_count = ostq_num_sms();
  return args;
}

// workspace: ostq_cutlass_workspace's bytes (the same arguments)
template <class K40>
static int run(const void* w, const void* a, void* d, int M, int N, int K, const float* a_scale,
               const float* a_zero, const float* w_scale, const int* w_sum, void* workspace, cudaStream_t st) {
  using Gemm = typename K40::Gemm;
  auto args = make_args<K40>(w, a, d, M, N, K, a_scale, a_zero, w_scale, w_sum);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return (int)cudaErrorNotSupported;
  if (gemm.initialize(args, workspace, st) != cutlass::Status::kSuccess) return (int)cudaErrorInvalidValue;
  if (gemm.run(st) != cutlass::Status::kSuccess) return (int)cudaErrorLaunchFailure;
  return (int)cudaGetLastError();
}

using K40 = Kind40<Shape<_128, _128, _128>>;
using K40Wide = Kind40<Shape<_128, _256, _128>>;
using K41 = Kind40<Shape<_128, _64, _128>, cutlass::gemm::StreamKScheduler>;
using K42 = Kind40<Shape<_128, _128, _128>, cutlass::gemm::StreamKScheduler>;
using K43 = Kind40<Shape<_128, _32, _128>, cutlass::gemm::StreamKScheduler>;

template <class K40>
static long long workspace_bytes(int M, int N, int K) {
  return (long long)K40::Gemm::get_workspace_size(
      make_args<K40>(nullptr, nullptr, nullptr, M, N, K, nullptr, nullptr, nullptr, nullptr));
}

// Kinds 40-43 (ostquant_kernels.cu's ostq_int4_gemm).
extern "C" long long ostq_cutlass_workspace(int M, int N, int K, int kind) {
  switch (kind) {
    case 40: return wide_tile(M) ? workspace_bytes<K40Wide>(M, N, K) : workspace_bytes<K40>(M, N, K);
    case 41: return workspace_bytes<K41>(M, N, K);
    case 42: return workspace_bytes<K42>(M, N, K);
    case 43: return workspace_bytes<K43>(M, N, K);
    default: return 0;
  }
}

extern "C" int ostq_cutlass_gemm(const void* w, const void* a, void* d, int M, int N, int K, const float* a_scale,
                                 const float* a_zero, const float* w_scale, const int* w_sum, void* workspace,
                                 int kind, void* stream) {
  if (N % 16 || K % 128) return (int)cudaErrorNotSupported;
  const auto st = static_cast<cudaStream_t>(stream);
#define OSTQ_RUN(T) run<T>(w, a, d, M, N, K, a_scale, a_zero, w_scale, w_sum, workspace, st)
  switch (kind) {
    case 40: return wide_tile(M) ? OSTQ_RUN(K40Wide) : OSTQ_RUN(K40);
    case 41: return OSTQ_RUN(K41);
    case 42: return OSTQ_RUN(K42);
    case 43: return OSTQ_RUN(K43);
    default: return (int)cudaErrorInvalidValue;
  }
#undef OSTQ_RUN
}
