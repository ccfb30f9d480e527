// Block-scaled FP4 x FP4 GEMM shared by sm_100a (fp4_gemm_sm100.cu) and sm_120a (fp4_gemm_sm120.cu): the CUTLASS
// collectives, the host-side argument packing and the scale-factor layout queries, parameterized by the
// architecture tag, the minimum compute capability and the MMA tile. Each .cu names its instance and exports it
// with WUSH_FP4_GEMM_EXPORTS.
//
//   A: activations (M, K) e2m1, K-major, two per byte (even element in the low nibble)
//   B: weight      (N, K) e2m1, K-major
//   Fmt 0 = MXFP4: ue8m0 scales, one per 32 values;  Fmt 1 = NVFP4: ue4m3 scales, one per 16 values
//   D: (M, N) row-major; Out 0/1/2 = bf16 / fp16 / fp32
#pragma once

#include "wush_gemm_common.cuh"

#include "cutlass/detail/sm100_blockscaled_layout.hpp"  // the Sm1xx scale layout, shared with sm_120

namespace wush {

template <class ArchTag, int MinCC, class MmaTileShapeT, int Fmt, int Out>
struct Fp4GemmBlockScaled {
  using ElementAB = typename Fp4Element<Fmt>::type;
  using ElementOut = typename OutputType<Out>::type;
  static constexpr int kMinCC = MinCC;
  static constexpr int kSfVec = Fp4Element<Fmt>::kSfVec;
  static constexpr int kAlignK = 32;  // 32 e2m1 values = 16 bytes, the TMA row granularity
  static constexpr int kAlignN = align_out<ElementOut>();

  using MmaTileShape = MmaTileShapeT;
  using ClusterShape = Shape<_1, _1, _1>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassTensorOp, MmaTileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignN,  // no source operand C
      ElementOut, cutlass::layout::RowMajor, kAlignN,
      cutlass::epilogue::collective::EpilogueScheduleAuto, ScaleBiasEvt<MmaTileShape, ElementOut>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassBlockScaledTensorOp,
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

// Host pass: the six (format x output) variants' Params builders and the scale-factor layout queries of
// wush_<ARCH>_*; device pass: the kernel of -DWUSH_VARIANT / -DWUSH_FMT / -DWUSH_OUT.
#ifdef WUSH_HOST_ONLY
#define WUSH_FP4_GEMM_EXPORTS(ARCH, GEMM)                                                                     \
  WUSH_DEFINE_HOST(fp4_##ARCH##_mxfp4_bf16, GEMM<0, 0>)                                                       \
  WUSH_DEFINE_HOST(fp4_##ARCH##_mxfp4_fp16, GEMM<0, 1>)                                                       \
  WUSH_DEFINE_HOST(fp4_##ARCH##_mxfp4_fp32, GEMM<0, 2>)                                                       \
  WUSH_DEFINE_HOST(fp4_##ARCH##_nvfp4_bf16, GEMM<1, 0>)                                                       \
  WUSH_DEFINE_HOST(fp4_##ARCH##_nvfp4_fp16, GEMM<1, 1>)                                                       \
  WUSH_DEFINE_HOST(fp4_##ARCH##_nvfp4_fp32, GEMM<1, 2>)                                                       \
  extern "C" WUSH_EXPORT int64_t wush_fp4_##ARCH##_sf_offset(int32_t fmt, int64_t rows, int64_t k, int64_t row, \
                                                            int64_t kgroup) {                                \
    return fmt == 0 ? GEMM<0, 0>::sf_offset(rows, k, row, kgroup) : GEMM<1, 0>::sf_offset(rows, k, row, kgroup); \
  }                                                                                                           \
  extern "C" WUSH_EXPORT int64_t wush_fp4_##ARCH##_sf_size(int32_t fmt, int64_t rows, int64_t k) {            \
    return fmt == 0 ? GEMM<0, 0>::sf_size(rows, k) : GEMM<1, 0>::sf_size(rows, k);                            \
  }
#else
#define WUSH_FP4_GEMM_EXPORTS(ARCH, GEMM) WUSH_DEFINE_KERNEL(WUSH_VARIANT, GEMM<WUSH_FMT, WUSH_OUT>::GemmKernel)
#endif
