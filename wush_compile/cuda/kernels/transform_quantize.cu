// Fused per-block transform + FP4 quantize (SPEC sections 3 and 5), writing the scale bytes straight into the
// 128x4 swizzled layout the block-scaled GEMMs read (or row-major, for tests and the reference layout).
//
//   y_b = T_b x_b  (fp32, per group of G = 32 (MXFP4) or 16 (NVFP4) columns; T may be null = identity)
//   MXFP4: E = floor(log2(amax)) clamped to [-127, 127] (amax == 0 -> -127); codes = RNE_e2m1((y * 2^-E) * 3);
//          scale byte = E + 127
//   NVFP4: s = e4m3_rne(min(amax / (6 g), 448)); codes = RNE_e2m1(y / (s g)) (signed zero if s g == 0);
//          scale byte = s
//   a group holding NaN or +-Inf: scale 0xFF (MXFP4) / 0x7F (NVFP4) and zero codes.
//   Codes: bit 3 sign, bits 0-2 index of 0, .5, 1, 1.5, 2, 3, 4, 6; ties to the even index; two per byte, the
//   even element in the low nibble.
// Every step is the fp32 operation wush_compile/formats.py performs, so codes and scales match the torch
// reference bit for bit wherever the fp32 transform itself is exact (the sum order of y may differ).
//
// Launch (wush_compile.cuda.layout.quantize_launch): grid (K / G, ceil(M / rows_per_cta)), block rows_per_cta
// threads; one thread per (row, group); T_b staged once per CTA in shared memory and read as broadcasts.
// Groups vary fastest over the grid, so the CTAs resident together read neighbouring bytes of the same rows.
// Plain CUDA (no architecture-specific instructions): built for every architecture the package ships.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

extern "C" {
struct WushQuantArgs {
  const void* x;         // (M, K) activations, rows x_row_stride elements apart
  const float* t;        // (K/G, G, G) fp32 transform, or null for the identity
  const float* gs;       // NVFP4 activation global scale (fp32 device scalar); unused for MXFP4
  uint8_t* codes;        // (M, K/2) packed e2m1
  uint8_t* scales;       // swizzled: ceil(M/128)*128 x ceil(K/G/4)*4 bytes; else (M, K/G) row-major
  int64_t m, k;
  int64_t x_row_stride;  // elements
  int32_t swizzled;      // 1: 128x4 swizzled scale layout, 0: row-major (M, K/G)
  int32_t reserved;
};
}

namespace {

__device__ __forceinline__ float load_as_float(const float* p) { return *p; }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_as_float(const __half* p) { return __half2float(*p); }

// One group's G inputs, as 16-byte vector loads (the row stride and base are 16-byte aligned by contract).
template <int G, class TX>
__device__ __forceinline__ void load_group(const TX* src, float (&v)[G]) {
  constexpr int kPerVec = 16 / sizeof(TX);
  static_assert(G % kPerVec == 0, "group must be a whole number of 16-byte vectors");
#pragma unroll
  for (int i = 0; i < G / kPerVec; ++i) {
    uint4 raw = reinterpret_cast<const uint4*>(src)[i];
    const TX* e = reinterpret_cast<const TX*>(&raw);
#pragma unroll
    for (int j = 0; j < kPerVec; ++j) v[i * kPerVec + j] = load_as_float(e + j);
  }
}

// e2m1 index of |v| with ties to the even index, saturating at 6 (the thresholds of formats.round_to_e2m1).
__device__ __forceinline__ uint32_t e2m1_code(float v) {
  float a = fabsf(v);
  uint32_t idx = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  uint32_t sign = (signbit(v) && !isnan(v)) ? 8u : 0u;
  return idx | sign;
}

// 2^e as an exact fp32 for e in [-127, 127] (2^-127 is subnormal).
__device__ __forceinline__ float exp2_exact(int e) {
  return e >= -126 ? __int_as_float((e + 127) << 23) : __int_as_float(0x00400000);
}

__device__ __forceinline__ int64_t swizzled_offset(int64_t row, int64_t kgroup, int64_t kgroups) {
  int64_t ktiles = (kgroups + 3) / 4;
  int64_t tile = (row / 128) * ktiles + kgroup / 4;
  int64_t r = row % 128;
  return tile * 512 + (r % 32) * 16 + (r / 32) * 4 + kgroup % 4;
}

template <int G, bool kNv, class TX>
__device__ __forceinline__ void transform_quantize(WushQuantArgs const& a) {
  extern __shared__ float smem_t[];  // (G, G) of this CTA's block
  const int64_t kgroups = a.k / G;
  const int64_t b = blockIdx.x;
  const bool has_t = a.t != nullptr;
  if (has_t) {
    const float* tb = a.t + b * G * G;
    for (int i = threadIdx.x; i < G * G; i += blockDim.x) smem_t[i] = tb[i];
    __syncthreads();
  }
  const int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (row >= a.m) return;

  float x[G];
  load_group<G>(static_cast<const TX*>(a.x) + row * a.x_row_stride + b * G, x);
  float y[G];
  if (has_t) {
#pragma unroll
    for (int i = 0; i < G; ++i) {
      float acc = 0.0f;
#pragma unroll
      for (int j = 0; j < G; j += 4) {
        float4 t4 = *reinterpret_cast<const float4*>(&smem_t[i * G + j]);
        acc = fmaf(t4.x, x[j], acc);
        acc = fmaf(t4.y, x[j + 1], acc);
        acc = fmaf(t4.z, x[j + 2], acc);
        acc = fmaf(t4.w, x[j + 3], acc);
      }
      y[i] = acc;
    }
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) y[i] = x[i];
  }

  bool bad = false;
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < G; ++i) {
    bad |= !isfinite(y[i]);
    amax = fmaxf(amax, isfinite(y[i]) ? fabsf(y[i]) : 0.0f);
  }

  uint8_t scale;
  uint32_t codes[G];
  if (bad) {
    scale = kNv ? 0x7F : 0xFF;
#pragma unroll
    for (int i = 0; i < G; ++i) codes[i] = 0;
  } else if (!kNv) {
    // floor(log2(amax)) is the biased exponent field - 127 for normal amax; subnormal or zero amax -> -127.
    int e = static_cast<int>((__float_as_uint(amax) >> 23) & 0xFF) - 127;
    scale = static_cast<uint8_t>(e + 127);
    float inv = exp2_exact(-e);
#pragma unroll
    for (int i = 0; i < G; ++i) codes[i] = e2m1_code(__fmul_rn(__fmul_rn(y[i], inv), 3.0f));
  } else {
    float g = *a.gs;
    float s_in = __fdiv_rn(amax, __fmul_rn(6.0f, g));
    __nv_fp8_storage_t s8 = __nv_cvt_float_to_fp8(fminf(s_in, 448.0f), __NV_SATFINITE, __NV_E4M3);
    if (isnan(s_in)) s8 = 0x7F;
    scale = static_cast<uint8_t>(s8);
    float s = __half2float(__half(__nv_cvt_fp8_to_halfraw(s8, __NV_E4M3)));
    float d = __fmul_rn(s, g);
#pragma unroll
    for (int i = 0; i < G; ++i) {
      float v = d == 0.0f ? (signbit(y[i]) ? -0.0f : 0.0f) : __fdiv_rn(y[i], d);
      codes[i] = e2m1_code(v);
    }
  }

  // Pack: byte j = code[2j] | code[2j+1] << 4; G/2 bytes (16 for MXFP4, 8 for NVFP4) in one store.
  uint32_t words[G / 8];
#pragma unroll
  for (int w = 0; w < G / 8; ++w) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) word |= codes[w * 8 + j] << (4 * j);
    words[w] = word;
  }
  uint8_t* dst = a.codes + row * (a.k / 2) + b * (G / 2);
  if constexpr (G == 32) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
    *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
  }
  int64_t so = a.swizzled ? swizzled_offset(row, b, kgroups) : row * kgroups + b;
  a.scales[so] = scale;
}

}  // namespace

#define WUSH_TQ_KERNEL(NAME, G, NV, TX)                                                              \
  extern "C" __global__ void __launch_bounds__(128) wush_tq_##NAME(const WushQuantArgs args) {       \
    transform_quantize<G, NV, TX>(args);                                                             \
  }

WUSH_TQ_KERNEL(mxfp4_fp32, 32, false, float)
WUSH_TQ_KERNEL(mxfp4_bf16, 32, false, __nv_bfloat16)
WUSH_TQ_KERNEL(mxfp4_fp16, 32, false, __half)
WUSH_TQ_KERNEL(nvfp4_fp32, 16, true, float)
WUSH_TQ_KERNEL(nvfp4_bf16, 16, true, __nv_bfloat16)
WUSH_TQ_KERNEL(nvfp4_fp16, 16, true, __half)
