// Block-scaled FP4 x FP4 GEMM for sm_100a (B200 / GB200): tcgen05 block-scaled MMA with the accumulator in
// tensor memory, TMA loads of the e2m1 operands and of their scale factors (128x4 swizzled layout), and the
// wush epilogue (global scales + bias, see wush_gemm_common.cuh); the shared body is fp4_gemm_blockscaled.cuh.
//
//   A: activations (M, K) e2m1, K-major, two per byte (even element in the low nibble)
//   B: weight      (N, K) e2m1, K-major
//   Fmt 0 = MXFP4: ue8m0 scales, one per 32 values;  Fmt 1 = NVFP4: ue4m3 scales, one per 16 values
//   D: (M, N) row-major; Out 0/1/2 = bf16 / fp16 / fp32
//
// Device pass: -DWUSH_VARIANT=<name> -DWUSH_FMT=<0|1> -DWUSH_OUT=<0|1|2>. Host pass: -DWUSH_HOST_ONLY.
#include "fp4_gemm_blockscaled.cuh"

namespace wush {

template <int Fmt, int Out>
using Fp4GemmSm100 = Fp4GemmBlockScaled<cutlass::arch::Sm100, 100, Shape<_128, _128, _256>, Fmt, Out>;  // one SM per MMA (block-scaled tcgen05 M = 128)

}  // namespace wush

WUSH_FP4_GEMM_EXPORTS(sm100, wush::Fp4GemmSm100)
