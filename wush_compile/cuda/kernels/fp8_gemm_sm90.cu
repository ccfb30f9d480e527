// FP8 (e4m3 x e4m3) GEMM for sm_90a (H100 / H200) with row-wise scales: warp-specialized cooperative wgmma
// kernel with fp32 promotion of the tensor-core accumulator (the accurate fp8 mode, not "fast accumulation"),
// TMA loads, a 1x2 cluster (A multicast along N), and the epilogue
//
//   D = cast_out( ((acc * a_scale[m]) * b_scale[n]) * (alpha_a * alpha_b) + bias[n] )     all fp32
//
// This is the Hopper half of the cubin path: the same build, loader and launch code as the Blackwell FP4
// kernels, runnable (and tested) on the project's H100. With power-of-two row scales it is the exact
// MXFP4 -> fp8 re-encoding GEMM of KERNELS.md. A null a_scale / b_scale reads 1 (per-tensor scaling only).
//
//   A: (M, K) e4m3 K-major; B: (N, K) e4m3 K-major (the weight); D: (M, N) row-major, Out 0/1/2 = bf16/fp16/fp32
//
// Device pass: -DWUSH_VARIANT=<name> -DWUSH_OUT=<0|1|2>. Host pass: -DWUSH_HOST_ONLY.
#include "wush_gemm_common.cuh"

namespace wush {

template <class CtaTileShapeMNK, class ElementD>
using RowScaleBiasEvt = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::plus, ElementD, float, cutlass::FloatRoundStyle::round_to_nearest>,
    fusion::Sm90EVT<
        fusion::Sm90Compute<cutlass::multiplies, float, float, cutlass::FloatRoundStyle::round_to_nearest>,
        fusion::Sm90EVT<
            fusion::Sm90Compute<cutlass::multiplies, float, float, cutlass::FloatRoundStyle::round_to_nearest>,
            fusion::Sm90EVT<
                fusion::Sm90Compute<cutlass::multiplies, float, float, cutlass::FloatRoundStyle::round_to_nearest>,
                fusion::Sm90AccFetch,
                fusion::Sm90ColBroadcast<0, CtaTileShapeMNK, float, float, Stride<_1, _0, int64_t>, 1>>,  // a_scale[m]
            fusion::Sm90RowBroadcast<0, CtaTileShapeMNK, float, float, Stride<_0, _1, int64_t>, 4>>,    // b_scale[n]
        fusion::Sm90ScalarBroadcast<float, Stride<_0, _0, int64_t>, 2>>,                                 // alpha_a*alpha_b
    fusion::Sm90RowBroadcast<0, CtaTileShapeMNK, float, float, Stride<_0, _1, int64_t>, 4>>;            // bias[n]

template <int Out>
struct Fp8GemmSm90 {
  using ElementAB = cutlass::float_e4m3_t;
  using ElementOut = typename OutputType<Out>::type;
  static constexpr int kMinCC = 90;
  static constexpr int kSfVec = 0;
  static constexpr int kAlignK = 16;  // 16 bytes of e4m3
  static constexpr int kAlignN = align_out<ElementOut>();

  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _2, _1>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignN,
      ElementOut, cutlass::layout::RowMajor, kAlignN,
      cutlass::epilogue::TmaWarpSpecializedCooperative, RowScaleBiasEvt<TileShape, ElementOut>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, cutlass::layout::RowMajor, kAlignK,
      ElementAB, cutlass::layout::ColumnMajor, kAlignK,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, void>;

#ifdef WUSH_HOST_ONLY
  static int make_arguments(WushGemmArgs const& a, typename GemmKernel::Arguments& out) {
    using K = GemmKernel;
    int m = static_cast<int>(a.m), n = static_cast<int>(a.n), k = static_cast<int>(a.k);
    out.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    out.problem_shape = cute::make_shape(m, n, k, 1);
    out.mainloop.ptr_A = static_cast<ElementAB const*>(a.a);
    out.mainloop.dA = packed_stride<typename K::StrideA>(m, k);
    out.mainloop.ptr_B = static_cast<ElementAB const*>(a.b);
    out.mainloop.dB = packed_stride<typename K::StrideB>(n, k);
    auto& t = out.epilogue.thread;
    t.op_0.op_0.op_0.op_1.ptr_col = static_cast<float const*>(a.a_scale);
    t.op_0.op_0.op_0.op_1.null_default = 1.0f;
    t.op_0.op_0.op_1.ptr_row = static_cast<float const*>(a.b_scale);
    t.op_0.op_0.op_1.null_default = 1.0f;
    t.op_0.op_1.scalars[0] = 1.0f;
    t.op_0.op_1.scalars[1] = 1.0f;
    t.op_0.op_1.scalar_ptrs[0] = a.alpha_a;
    t.op_0.op_1.scalar_ptrs[1] = a.alpha_b;
    t.op_1.ptr_row = a.bias;
    t.op_1.null_default = 0.0f;
    out.epilogue.ptr_C = nullptr;
    out.epilogue.dC = packed_stride<typename K::StrideC>(m, n);
    out.epilogue.ptr_D = static_cast<typename K::ElementD*>(a.d);
    out.epilogue.dD = packed_stride<typename K::StrideD>(m, n);
    out.hw_info.device_id = 0;
    out.hw_info.sm_count = a.sm_count;
    out.scheduler.max_swizzle_size = a.max_swizzle;
    return 0;
  }
#endif
};

}  // namespace wush

#ifdef WUSH_HOST_ONLY
WUSH_DEFINE_HOST(fp8_sm90_bf16, wush::Fp8GemmSm90<0>)
WUSH_DEFINE_HOST(fp8_sm90_fp16, wush::Fp8GemmSm90<1>)
WUSH_DEFINE_HOST(fp8_sm90_fp32, wush::Fp8GemmSm90<2>)
#else
WUSH_DEFINE_KERNEL(WUSH_VARIANT, wush::Fp8GemmSm90<WUSH_OUT>::GemmKernel)
#endif
