// Pieces shared by the CUTLASS GEMM variants: element types, packed strides, the host-side Params builder,
// and the epilogue visitor tree that applies the SPEC's scaling:
//
//   D = cast_out( (acc * (alpha_a * alpha_b)) + bias[n] )          all in fp32, in that order
//
// which is exactly the reference's `acc * (a_gs * w_gs)` then `+ bias.float()` then `.to(out_dtype)`.
// The two global scales are read from device memory (no host sync, graph capturable); a null bias reads 0.
#pragma once

#include "wush_gemm_abi.cuh"

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/device_kernel.h"

namespace wush {

// Output element of WUSH_OUT / of a host-pass instantiation: 0 = bfloat16, 1 = float16, 2 = float32.
template <int Out>
struct OutputType;
template <>
struct OutputType<0> { using type = cutlass::bfloat16_t; };
template <>
struct OutputType<1> { using type = cutlass::half_t; };
template <>
struct OutputType<2> { using type = float; };

// The e2m1 operand type of a format: 0 = MXFP4 (ue8m0 scale per 32), 1 = NVFP4 (ue4m3 scale per 16).
template <int Fmt>
struct Fp4Element;
template <>
struct Fp4Element<0> {
  using type = cutlass::mx_float4_t<cutlass::float_e2m1_t>;
  static constexpr int kSfVec = 32;
};
template <>
struct Fp4Element<1> {
  using type = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
  static constexpr int kSfVec = 16;
};

template <class ElementOut>
constexpr int align_out() {
  return 128 / cutlass::sizeof_bits<ElementOut>::value;  // 16-byte rows for TMA stores
}

// A packed (rows, cols) row-major stride of the (int64, _1, int64) kind CUTLASS uses for K-major operands and
// row-major outputs; counts elements (sub-byte elements included).
template <class Stride>
inline Stride packed_stride(int64_t rows, int64_t cols) {
  Stride s{};
  static_assert(cute::is_static<cute::remove_cvref_t<decltype(cute::get<1>(s))>>::value,
                "wush: expected a unit stride in mode 1 (K-major operand / row-major output)");
  cute::get<0>(s) = cols;
  cute::get<2>(s) = rows * cols;
  return s;
}

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// (acc * (alpha_a * alpha_b)) + bias, converted to ElementOut with round-to-nearest-even.
template <class CtaTileShapeMNK, class ElementD>
using ScaleBiasEvt = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::plus, ElementD, float, cutlass::FloatRoundStyle::round_to_nearest>,
    fusion::Sm90EVT<
        fusion::Sm90Compute<cutlass::multiplies, float, float, cutlass::FloatRoundStyle::round_to_nearest>,
        fusion::Sm90AccFetch,
        // Two device scalars, multiplied together (the reduction of a multi-scalar broadcast).
        fusion::Sm90ScalarBroadcast<float, Stride<_0, _0, int64_t>, 2>>,
    fusion::Sm90RowBroadcast<0, CtaTileShapeMNK, float, float, Stride<_0, _1, int64_t>, 4>>;

// Arguments of ScaleBiasEvt. A tree's arguments hold its children's then its own: op_0, op_1, ... in order,
// so {op_0 = {op_0 = acc, op_1 = alpha, op_2 = multiplies}, op_1 = bias, op_2 = plus}.
template <class EvtArguments>
inline EvtArguments scale_bias_arguments(WushGemmArgs const& a) {
  EvtArguments t{};
  auto& alpha = t.op_0.op_1;
  alpha.scalars[0] = 1.0f;
  alpha.scalars[1] = 1.0f;
  alpha.scalar_ptrs[0] = a.alpha_a;
  alpha.scalar_ptrs[1] = a.alpha_b;
  t.op_1.ptr_row = a.bias;
  t.op_1.null_default = 0.0f;
  return t;
}

}  // namespace wush

// Host side of WUSH_DEFINE_HOST (see wush_gemm_abi.cuh).
#ifdef WUSH_HOST_ONLY
namespace wush {

template <class Config>
int kernel_info(WushKernelInfo* info) {
  using GemmKernel = typename Config::GemmKernel;
  using TileShape = typename GemmKernel::TileShape;
  using ClusterShape = typename GemmKernel::DispatchPolicy::ClusterShape;
  std::memset(info, 0, sizeof(WushKernelInfo));
  info->abi_version = WUSH_ABI_VERSION;
  info->params_bytes = static_cast<int32_t>(sizeof(typename GemmKernel::Params));
  dim3 block = GemmKernel::get_block_shape();
  info->block[0] = block.x;
  info->block[1] = block.y;
  info->block[2] = block.z;
  info->cluster[0] = cute::size<0>(ClusterShape{});
  info->cluster[1] = cute::size<1>(ClusterShape{});
  info->cluster[2] = cute::size<2>(ClusterShape{});
  info->smem_bytes = GemmKernel::SharedStorageSize;
  info->min_cc = Config::kMinCC;
  info->tile[0] = cute::size<0>(TileShape{});
  info->tile[1] = cute::size<1>(TileShape{});
  info->tile[2] = cute::size<2>(TileShape{});
  info->align_k = Config::kAlignK;
  info->align_n = Config::kAlignN;
  info->sf_vec = Config::kSfVec;
  return 0;
}

// Fill `params_out` (params_cap bytes) and `grid`; returns 0, or a nonzero code with last_error set.
template <class Config>
int prepare(WushGemmArgs const* args, void* params_out, int64_t params_cap, int32_t* grid,
            int64_t* workspace_bytes) {
  using GemmKernel = typename Config::GemmKernel;
  using Params = typename GemmKernel::Params;
  if (params_cap < static_cast<int64_t>(sizeof(Params))) {
    return fail(1, "params buffer holds %lld bytes, Params needs %lld", params_cap,
                static_cast<long long>(sizeof(Params)));
  }
  if (args->m < 1 || args->n < 1 || args->k < 1 || args->m > INT32_MAX || args->n > INT32_MAX ||
      args->k > INT32_MAX) {
    return fail(2, "bad problem M=%lld N=%lld K=%lld (each must be in [1, 2^31))", args->m, args->n, args->k);
  }
  if (args->k % Config::kAlignK != 0 || args->n % Config::kAlignN != 0) {
    return fail(2, "K=%lld must be a multiple of %lld and N=%lld of the output alignment", args->k,
                Config::kAlignK, args->n);
  }
  typename GemmKernel::Arguments arguments{};
  int rc = Config::make_arguments(*args, arguments);
  if (rc != 0) return rc;
  size_t ws = GemmKernel::get_workspace_size(arguments);
  *workspace_bytes = static_cast<int64_t>(ws);
  if (ws != 0) {
    return fail(3, "this variant asks for %lld bytes of workspace; wush variants are built to need none",
                static_cast<long long>(ws));
  }
  if (!GemmKernel::can_implement(arguments)) {
    return fail(4, "CUTLASS cannot implement M=%lld N=%lld K=%lld with this variant (alignment or shape)",
                args->m, args->n, args->k);
  }
  encode_failures() = 0;
  Params params = GemmKernel::to_underlying_arguments(arguments, nullptr);
  if (encode_failures() != 0) {
    return fail(5, "cuTensorMapEncodeTiled failed %lld time(s) (no CUDA driver, or a misaligned pointer)",
                encode_failures());
  }
  dim3 g = GemmKernel::get_grid_shape(params);
  grid[0] = g.x;
  grid[1] = g.y;
  grid[2] = g.z;
  std::memcpy(params_out, &params, sizeof(Params));
  return 0;
}

}  // namespace wush
#endif  // WUSH_HOST_ONLY
