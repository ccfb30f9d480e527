// Block-scaled FP4 x FP4 GEMM for sm_120a (RTX PRO 6000 / RTX 50xx): warp-level block-scaled MMA (mma.sync .kind::mxf4*), accumulator in
// registers, TMA loads of the e2m1 operands and of their scale factors (128x4 swizzled layout), and the
// wush epilogue (global scales + bias, see wush_gemm_common.cuh).
//
//   A: activations (M, K) e2m1, K-major, two per byte (even element in the low nibble)
//   B: weight      (N, K) e2m1, K-major
//   Fmt 0 = MXFP4: ue8m0 scales, one per 32 values;  Fmt 1 = NVFP4: ue4m3 scales, one per 16 values
//   D: (M, N) row-major; Out 0/1/2 = bf16 / fp16 / fp32
//
// Device pass: -DWUSH_VARIANT=<name> -DWUSH_FMT=<0|1> -DWUSH_OUT=<0|1|2>. Host pass: -DWUSH_HOST_ONLY.
#include "wush_gemm_common.cuh"

#include "cutlass/detail/sm100_blockscaled_layout.hpp"  // the Sm1xx scale layout, shared with sm_120

namespace wush {

template <int Fmt, int Out>
struct Fp4GemmSm120 {
  using ElementAB = typename Fp4Element<Fmt>::type;
  using ElementOut = typename OutputType<Out>::type;
  static constexpr int kMinCC = 120;
  static constexpr int kSfVec = Fp4Element<Fmt>::kSfVec;
  static constexpr int kAlignK = 32;  // 32 e2m1 values = 16 bytes, the TMA row granularity
  static constexpr int kAlignN = align_out<ElementOut>();

  using MmaTileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _1, _1>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm120, cutlass::arch::OpClassTensorOp, MmaTileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignN,  // no source operand C
      ElementOut, cutlass::layout::RowMajor, kAlignN,
      cutlass::epilogue::collective::EpilogueScheduleAuto, ScaleBiasEvt<MmaTileShape, ElementOut>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm120, cutlass::arch::OpClassBlockScaledTensorOp,
      ElementAB, cutlass::layout::RowMajor, kAlignK,
      ElementAB, cutlass::layout::ColumnMajor, kAlignK,
      float, MmaTileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, void>;

#ifdef WUSH_HOST_ONLY
  using BlkScaledConfig = typename CollectiveMainloop::Sm1xxBlkScaledConfig;

  static int make_arguments(WushGemmArgs const& a, typename GemmKernel::Arguments& out) {
    using K = GemmKernel;
    int m = static_cast<int>(a.m), n = static_cast<int>(a.n), k = static_cast<int>(a.k);
    auto problem = cute::make_shape(m, n, k, 1);
    out.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    out.problem_shape = problem;
    out.mainloop.ptr_A = static_cast<typename CollectiveMainloop::ArrayElementA const*>(a.a);
    out.mainloop.dA = packed_stride<typename K::StrideA>(m, k);
    out.mainloop.ptr_B = static_cast<typename CollectiveMainloop::ArrayElementB const*>(a.b);
    out.mainloop.dB = packed_stride<typename K::StrideB>(n, k);
    out.mainloop.ptr_SFA = static_cast<typename CollectiveMainloop::ElementSF const*>(a.a_scale);
    out.mainloop.layout_SFA = BlkScaledConfig::tile_atom_to_shape_SFA(problem);
    out.mainloop.ptr_SFB = static_cast<typename CollectiveMainloop::ElementSF const*>(a.b_scale);
    out.mainloop.layout_SFB = BlkScaledConfig::tile_atom_to_shape_SFB(problem);
    out.epilogue.thread = scale_bias_arguments<typename K::CollectiveEpilogue::FusionCallbacks::Arguments>(a);
    out.epilogue.ptr_C = nullptr;
    out.epilogue.dC = packed_stride<typename K::StrideC>(m, n);
    out.epilogue.ptr_D = static_cast<typename K::ElementD*>(a.d);
    out.epilogue.dD = packed_stride<typename K::StrideD>(m, n);
    out.hw_info.device_id = 0;
    out.hw_info.sm_count = a.sm_count;
    out.scheduler.max_swizzle_size = a.max_swizzle;
    return 0;
  }

  // Offset of the scale byte of (row, k-group) in the swizzled buffer of a (rows, K) operand, evaluated with
  // CUTLASS's own layout function (tests compare wush_compile.cuda.layout against it on the CPU).
  static int64_t sf_offset(int64_t rows, int64_t k, int64_t row, int64_t kgroup) {
    auto layout = BlkScaledConfig::tile_atom_to_shape_SFA(
        cute::make_shape(static_cast<int>(rows), 1, static_cast<int>(k), 1));
    return layout(static_cast<int>(row), static_cast<int>(kgroup * kSfVec), 0);
  }
  // Bytes the swizzled buffer of a (rows, K) operand spans, padding included.
  static int64_t sf_size(int64_t rows, int64_t k) {
    auto layout = BlkScaledConfig::tile_atom_to_shape_SFA(
        cute::make_shape(static_cast<int>(rows), 1, static_cast<int>(k), 1));
    return cute::cosize(cute::filter_zeros(layout));
  }
#endif
};

}  // namespace wush

#ifdef WUSH_HOST_ONLY
WUSH_DEFINE_HOST(fp4_sm120_mxfp4_bf16, wush::Fp4GemmSm120<0, 0>)
WUSH_DEFINE_HOST(fp4_sm120_mxfp4_fp16, wush::Fp4GemmSm120<0, 1>)
WUSH_DEFINE_HOST(fp4_sm120_mxfp4_fp32, wush::Fp4GemmSm120<0, 2>)
WUSH_DEFINE_HOST(fp4_sm120_nvfp4_bf16, wush::Fp4GemmSm120<1, 0>)
WUSH_DEFINE_HOST(fp4_sm120_nvfp4_fp16, wush::Fp4GemmSm120<1, 1>)
WUSH_DEFINE_HOST(fp4_sm120_nvfp4_fp32, wush::Fp4GemmSm120<1, 2>)

// The scale-factor layout the kernels read, per format (independent of the output type).
extern "C" WUSH_EXPORT int64_t wush_fp4_sm120_sf_offset(int32_t fmt, int64_t rows, int64_t k, int64_t row,
                                                        int64_t kgroup) {
  return fmt == 0 ? wush::Fp4GemmSm120<0, 0>::sf_offset(rows, k, row, kgroup)
                  : wush::Fp4GemmSm120<1, 0>::sf_offset(rows, k, row, kgroup);
}
extern "C" WUSH_EXPORT int64_t wush_fp4_sm120_sf_size(int32_t fmt, int64_t rows, int64_t k) {
  return fmt == 0 ? wush::Fp4GemmSm120<0, 0>::sf_size(rows, k) : wush::Fp4GemmSm120<1, 0>::sf_size(rows, k);
}
#else
WUSH_DEFINE_KERNEL(WUSH_VARIANT, wush::Fp4GemmSm120<WUSH_FMT, WUSH_OUT>::GemmKernel)
#endif
