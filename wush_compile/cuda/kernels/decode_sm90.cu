// Decode (M <= 16 tokens) calibrated FP4 linear for Hopper (sm_90a): two kernels, one CUDA graph node each.
//
// 1. wush_dec_act_<fmt>_<x dtype>: blockwise transform (fp32 FMA) + quantize of the few tokens (the fp32 operation
//    order of wush_compile/formats.py, as in transform_quantize.cu), written as the fp16 B operand of the GEMM's
//    tensor-core MMA, already in fragment order (one 16-byte record per lane, token tile and 32-column chunk):
//      MXFP4: B = code * 64 (exact), block scales 2^E as fp32 beside it (NaN for a non-finite group);
//      NVFP4: B = code * s (e4m3 scale, exact in fp16: |B| <= 6 * 448), no separate scale.
//    Optionally also the reference-layout codes (M, K/2) and scale bytes (M, K/G) (tests compare them bit for bit).
//    It triggers the dependent launch at once (programmatic dependent launch), so the GEMM can start streaming
//    weights while the tokens are quantized.
// 2. wush_dec_gemm_<fmt>_t<tiles>_w<warps>_s<stages>: swap-AB GEMM, mma.sync m16n8k16 f16 -> f32 with the weights
//    as A (16 output rows per fragment) and 8 tokens per B tile. Weights stream through a cp.async pipeline of
//    256-column stages into XOR-swizzled shared memory, ldmatrix.x4 hands each thread 4 bytes (8 nibbles) of
//    4 rows per 32-column chunk, and the nibbles become e4m3 bytes with shifts/masks and then fp16 (code * 2^-6)
//    with cvt.rn.f16x2.e4m3x2 (two values per instruction). The 16 K slots of an MMA are a fixed permutation of
//    the chunk's columns (SLOT_K below); the activation operand uses the same permutation, so the weights are
//    read in their stored layout.
//      MXFP4: a chunk is one scale group. Per group the two k16 MMAs start from zero; the exact group sum (products
//             of e2m1 values, a multiple of 1/4) is promoted into the fp32 accumulator times sw * sa, both exact
//             powers of two (SPEC: fp32 accumulation of code * 2^E products).
//      NVFP4: the e4m3 weight scale is folded into the fp16 operand (code * s * 2^-6 is exact in fp16), so the MMA
//             accumulates in fp32 directly; the epilogue multiplies by 64.
//    Work split: stream-K over (row block of 32 * warps rows) x (256-column stages) units, a contiguous range per
//    CTA; a row block touched by several CTAs is reduced by the last one to arrive (partials in a scratch buffer,
//    summed in CTA order: deterministic), which also re-arms the row block's counter. Global scales, bias and the
//    cast to x's dtype in the epilogue. No host synchronization, no data-dependent allocation: CUDA-graph safe.
//
// Shapes: K % 256 == 0, M <= 16; any N (rows past N are zero-filled on load and not stored).
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

extern "C" {
struct WushDecActArgs {
  const void* x;          // (M, K) activations, rows x_row_stride elements apart, 16-byte aligned rows
  const float* t;         // (K/G, G, G) fp32 transform
  const float* gs;        // NVFP4 activation global scale (fp32 device scalar); unused for MXFP4
  __half* b;              // (tiles, K/32, 32 lanes, 8) fp16 B fragments
  float* sa;              // MXFP4: (K/32, tiles, 8) fp32 block scales; null for NVFP4
  uint8_t* codes;         // optional (M, K/2) packed e2m1 codes (reference layout), or null
  uint8_t* scales;        // optional (M, K/G) scale bytes, or null
  int64_t m, k;
  int64_t x_row_stride;   // elements
  int32_t tiles;          // token tiles of 8 (1 or 2)
  int32_t reserved;
};

struct WushDecGemmArgs {
  const uint8_t* w;       // (N, K/2) packed e2m1 weight codes
  const uint8_t* ws;      // (N, K/G) weight scale bytes
  const __half* b;        // B fragments from the act kernel
  const float* sa;        // MXFP4 activation block scales (null for NVFP4)
  const float* ga;        // activation global scale (fp32 device scalar)
  const float* gw;        // weight global scale (fp32 device scalar)
  const float* bias;      // (N,) fp32 or null
  void* out;              // (M, N) in out_dtype
  float* part;            // (ctas, 2, rows * 8 * tiles) fp32 split-K partials (no initialization needed)
  int32_t* counters;      // (row blocks,) int32, zero between launches (the reducer re-arms them)
  int64_t m, n, k;
  int64_t units;          // row blocks * stages per row block
  int32_t stages_per_rb;  // K / 256
  int32_t ctas;           // grid size (<= units)
  int32_t out_dtype;      // 0 bf16, 1 fp16, 2 fp32
  int32_t reserved;
};
}

namespace {

constexpr int kChunkK = 32;      // columns per chunk: one MXFP4 group, two NVFP4 groups, 16 bytes of a weight row
constexpr int kStageChunks = 8;  // chunks per pipeline stage (256 columns)
// B record of a lane: half h holds the activation at column 8 * t4 + SLOT_K[h] of the chunk (t4 = lane % 4).
// It mirrors the weight side: e4m3 bytes of the low nibbles (columns 0, 2, 4, 6 of the thread's 8) and of the
// high nibbles (1, 3, 5, 7) convert to half2 pairs (0,2) (4,6) (1,3) (5,7); MMA k16 #0 takes (0,2) and (1,3) as
// its k slots {2t4, 2t4+1} and {2t4+8, 2t4+9}, k16 #1 takes (4,6) and (5,7). So SLOT_K = {0, 2, 1, 3, 4, 6, 5, 7}
// (wush_compile/cuda/decode.py holds the same table and the CPU emulation that checks it).

// ------------------------------------------------------------------ quantizer (formats.py operation order)

__device__ __forceinline__ float load_as_float(const float* p) { return *p; }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_as_float(const __half* p) { return __half2float(*p); }

// e2m1 index of |v| with ties to the even index, saturating at 6 (formats.round_to_e2m1's thresholds).
__device__ __forceinline__ uint32_t e2m1_code(float v) {
  float a = fabsf(v);
  uint32_t idx = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  uint32_t sign = (signbit(v) && !isnan(v)) ? 8u : 0u;
  return idx | sign;
}

// e2m1 code -> its value (0, .5, 1, 1.5, 2, 3, 4, 6, signed; -0 for code 8), built from the bits.
__device__ __forceinline__ float e2m1_value(uint32_t code) {
  const uint32_t idx = code & 7u;
  const uint32_t mag = idx < 2u ? idx * 0x3F000000u : ((((idx >> 1) + 126u) << 23) | ((idx & 1u) << 22));
  return __uint_as_float(mag | ((code & 8u) << 28));
}

// 2^e as an exact fp32 for e in [-127, 127] (2^-127 is subnormal).
__device__ __forceinline__ float exp2_exact(int e) {
  return e >= -126 ? __int_as_float((e + 127) << 23) : __int_as_float(0x00400000);
}

// e8m0 byte -> fp32 2^(byte - 127); 0xFF -> NaN (SPEC: non-finite group).
// Branch-free: 0 and 255 both get the 0x400000 bit (2^-127 and the quiet NaN 0x7FC00000).
__device__ __forceinline__ float e8m0_value(uint32_t byte) {
  const uint32_t special = ((byte + 1u) & 0xFEu) == 0u ? 0x00400000u : 0u;
  return __uint_as_float((byte << 23) | special);
}

// Transform + quantize one 32-column chunk for 16 tokens: 128 threads, thread (token = tid / 8, p = tid % 8) owns
// output columns 4p .. 4p+3 of the chunk; a group's amax is reduced over the threads that share it (8 for MXFP4,
// 4 for NVFP4) with warp shuffles.
template <int G, bool kNv, class TX>
__device__ __forceinline__ void decode_act(const WushDecActArgs& a) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  __shared__ __align__(16) float ts[kChunkK * G];  // row i = output column i of the chunk, G inputs
  const int c = blockIdx.x;
  const int64_t k0 = static_cast<int64_t>(c) * kChunkK;
  {
    const float4* src = reinterpret_cast<const float4*>(a.t + (k0 / G) * G * G);
    for (int i = threadIdx.x; i < kChunkK * G / 4; i += blockDim.x) reinterpret_cast<float4*>(ts)[i] = src[i];
  }
  __syncthreads();
  const int tok = threadIdx.x >> 3;
  const int p = threadIdx.x & 7;
  const bool tok_valid = tok < a.m;
  const int gcol = (4 * p / G) * G;  // the thread's group starts at this column of the chunk

  float x[G];
  if (tok_valid) {
    const TX* src = static_cast<const TX*>(a.x) + tok * a.x_row_stride + k0 + gcol;
    constexpr int kPerVec = 16 / sizeof(TX);
#pragma unroll
    for (int i = 0; i < G / kPerVec; ++i) {
      uint4 raw = reinterpret_cast<const uint4*>(src)[i];
      const TX* e = reinterpret_cast<const TX*>(&raw);
#pragma unroll
      for (int j = 0; j < kPerVec; ++j) x[i * kPerVec + j] = load_as_float(e + j);
    }
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j) x[j] = 0.0f;
  }
  float y[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float* trow = ts + (4 * p + q) * G;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < G; j += 4) {
      float4 t4 = *reinterpret_cast<const float4*>(trow + j);
      acc = fmaf(t4.x, x[j], acc);
      acc = fmaf(t4.y, x[j + 1], acc);
      acc = fmaf(t4.z, x[j + 2], acc);
      acc = fmaf(t4.w, x[j + 3], acc);
    }
    y[q] = acc;
  }
  bool bad = false;
  float amax = 0.0f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    bad |= !isfinite(y[q]);
    amax = fmaxf(amax, isfinite(y[q]) ? fabsf(y[q]) : 0.0f);
  }
  constexpr int kThreadsPerGroup = G / 4;
#pragma unroll
  for (int off = 1; off < kThreadsPerGroup; off <<= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));
    bad |= __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(bad), off) != 0;
  }

  uint32_t codes[4];
  float bval[4];
  uint8_t scale;
  float block_scale = 0.0f;  // MXFP4: 2^E (NaN for a bad group)
  if (!kNv) {
    int e = static_cast<int>((__float_as_uint(amax) >> 23) & 0xFF) - 127;
    scale = bad ? 0xFF : static_cast<uint8_t>(e + 127);
    float inv = exp2_exact(-e);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      codes[q] = bad ? 0u : e2m1_code(__fmul_rn(__fmul_rn(y[q], inv), 3.0f));
      bval[q] = e2m1_value(codes[q]) * 64.0f;
    }
    block_scale = bad ? __int_as_float(0x7FC00000) : exp2_exact(e);
  } else {
    if (bad) {
      scale = 0x7F;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        codes[q] = 0u;
        bval[q] = __int_as_float(0x7FC00000);
      }
    } else {
      float g = *a.gs;
      float s_in = __fdiv_rn(amax, __fmul_rn(6.0f, g));
      __nv_fp8_storage_t s8 = __nv_cvt_float_to_fp8(fminf(s_in, 448.0f), __NV_SATFINITE, __NV_E4M3);
      if (isnan(s_in)) s8 = 0x7F;
      scale = static_cast<uint8_t>(s8);
      float s = __half2float(__half(__nv_cvt_fp8_to_halfraw(s8, __NV_E4M3)));
      float d = __fmul_rn(s, g);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float v = d == 0.0f ? (signbit(y[q]) ? -0.0f : 0.0f) : __fdiv_rn(y[q], d);
        codes[q] = e2m1_code(v);
        bval[q] = e2m1_value(codes[q]) * s;  // exact: 2 significant bits times an e4m3 value
      }
    }
  }
  if (!tok_valid) {
#pragma unroll
    for (int q = 0; q < 4; ++q) bval[q] = 0.0f;
    block_scale = 0.0f;
  }

  if (tok < 8 * a.tiles) {
    // this thread's columns 4p + q = 8 * t4 + 4 * (p & 1) + q land in halves 4 * (p & 1) + {0, 2, 1, 3} of lane
    // (tok % 8) * 4 + t4 (SLOT_K), i.e. (q0, q2, q1, q3) in one 8-byte store
    const int t4 = p >> 1;
    const int lane = (tok & 7) * 4 + t4;
    const int64_t kc = a.k / kChunkK;
    __half2 lo = __floats2half2_rn(bval[0], bval[2]);
    __half2 hi = __floats2half2_rn(bval[1], bval[3]);
    uint2 rec = make_uint2(*reinterpret_cast<uint32_t*>(&lo), *reinterpret_cast<uint32_t*>(&hi));
    __half* dst = a.b + ((static_cast<int64_t>(tok >> 3) * kc + c) * 32 + lane) * 8 + (p & 1) * 4;
    *reinterpret_cast<uint2*>(dst) = rec;
    if (!kNv && p == 0) a.sa[(static_cast<int64_t>(c) * a.tiles + (tok >> 3)) * 8 + (tok & 7)] = block_scale;
  }
  if (tok_valid && a.codes != nullptr) {
    uint8_t* cd = a.codes + tok * (a.k / 2) + (k0 + 4 * p) / 2;
    cd[0] = static_cast<uint8_t>(codes[0] | (codes[1] << 4));
    cd[1] = static_cast<uint8_t>(codes[2] | (codes[3] << 4));
    if (4 * p % G == 0) a.scales[tok * (a.k / G) + (k0 + 4 * p) / G] = scale;
  }
}

// ------------------------------------------------------------------ GEMM helpers

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async8(void* smem, const void* gmem, bool valid) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  int n = valid ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// 8 e2m1 nibbles (a weight row's columns 0..7 of this thread, low nibble first) -> 4 half2 of code * 2^-6:
// h[0] = (0, 2), h[1] = (4, 6), h[2] = (1, 3), h[3] = (5, 7). A nibble s|m (sign, 3 magnitude bits) becomes the
// e4m3 byte s << 7 | m << 2, whose value is the e2m1 value times 2^-6 (magnitude 1 is e4m3's subnormal 2^-7).
// Six integer ops for 8 values: with the sign bits s = w & 0x88888888, each e4m3 word is one 3-input select
// (magnitude bits 2..4 from a shifted w, everything else from a shifted s, whose other bits land only on 2..4).
// The masks are held in registers the compiler cannot see through (opaque_masks()): with visible constants it
// re-derives (w & 0x88888888) << 4 as (w << 4) & 0x88888880 and spends a seventh op.
struct UnpackMasks {
  uint32_t mag, sign;
};

__device__ __forceinline__ UnpackMasks opaque_masks() {
  UnpackMasks m;
  asm volatile("mov.b32 %0, 0x1C1C1C1C;\n" : "=r"(m.mag));
  asm volatile("mov.b32 %0, 0x88888888;\n" : "=r"(m.sign));
  return m;
}

__device__ __forceinline__ void unpack8(uint32_t w, UnpackMasks m, uint32_t (&h)[4]) {
  // lop3 0xD8 = (c ? b : a)
  const uint32_t s = w & m.sign;
  uint32_t lo, hi;
  asm("lop3.b32 %0, %1, %2, %3, 0xD8;\n" : "=r"(lo) : "r"(s << 4), "r"(w << 2), "r"(m.mag));
  asm("lop3.b32 %0, %1, %2, %3, 0xD8;\n" : "=r"(hi) : "r"(s), "r"(w >> 2), "r"(m.mag));
  asm("{\n.reg .b16 a, b;\nmov.b32 {a, b}, %2;\ncvt.rn.f16x2.e4m3x2 %0, a;\ncvt.rn.f16x2.e4m3x2 %1, b;\n}\n"
      : "=r"(h[0]), "=r"(h[1])
      : "r"(lo));
  asm("{\n.reg .b16 a, b;\nmov.b32 {a, b}, %2;\ncvt.rn.f16x2.e4m3x2 %0, a;\ncvt.rn.f16x2.e4m3x2 %1, b;\n}\n"
      : "=r"(h[2]), "=r"(h[3])
      : "r"(hi));
}

__device__ __forceinline__ uint32_t hmul2_u32(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// D = A * B + C, m16n8k16, f16 operands, f32 accumulation.
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                         const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// Stream-K partition: CTA i owns units [start(i), start(i + 1)); cta_of(u) is the CTA owning unit u.
__device__ __forceinline__ int64_t unit_start(int64_t i, int64_t units, int64_t ctas) { return i * units / ctas; }
__device__ __forceinline__ int64_t cta_of(int64_t u, int64_t units, int64_t ctas) {
  return ((u + 1) * ctas - 1) / units;
}

template <bool kNv, int TILES, int NWARPS, int STAGES>
struct GemmLayout {
  static constexpr int kRows = NWARPS * 32;
  static constexpr int kCodeBytes = kRows * kStageChunks * 16;
  static constexpr int kScaleRowBytes = kNv ? 16 : 8;  // scale bytes per row per stage
  static constexpr int kScaleBytes = kRows * kScaleRowBytes;
  static constexpr int kBBytes = TILES * kStageChunks * 32 * 16;
  static constexpr int kSaBytes = kNv ? 0 : TILES * kStageChunks * 8 * 4;
  static constexpr int kStageBytes = kCodeBytes + kScaleBytes + kBBytes + kSaBytes;
  // per-warp decoded weight scales of one stage: MXFP4 fp32 [chunk][g][4 rows], NVFP4 half2 [chunk][2][g][4 rows]
  static constexpr int kWarpScaleBytes = kNv ? kStageChunks * 2 * 32 * 4 : kStageChunks * 32 * 4;
  static constexpr int kSmemBytes = STAGES * kStageBytes + NWARPS * kWarpScaleBytes;
  static constexpr int kElems = 2 * TILES * 4;  // accumulator elements per thread
  static constexpr int kPartPerCta = kRows * kElems;
};

template <bool kNv, int TILES, int NWARPS, int STAGES>
__device__ __forceinline__ void decode_gemm(const WushDecGemmArgs& a) {
  using L = GemmLayout<kNv, TILES, NWARPS, STAGES>;
  constexpr int kRows = L::kRows;
  constexpr int kThreads = NWARPS * 32;
  constexpr int kG = kNv ? 16 : 32;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int s_last;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t4 = lane & 3;
  const int64_t n = a.n;
  const int64_t kbytes = a.k / 2;
  const int64_t kgroups = a.k / kG;
  const int64_t kc = a.k / kChunkK;
  const int64_t spr = a.stages_per_rb;
  const int64_t units = a.units;
  const int64_t ctas = a.ctas;
  const int64_t u0 = unit_start(blockIdx.x, units, ctas);
  const int64_t u1 = unit_start(blockIdx.x + 1, units, ctas);
  const int count = static_cast<int>(u1 - u0);

  auto stage_ptr = [&](int s) { return smem + s * L::kStageBytes; };

  // Per-thread load plan (kRows == kThreads): 8 code copies of 16 bytes (rows tid / 8 + 16 k, chunk tid % 8, so a
  // warp copies 4 whole 128-byte row segments per instruction), one scale row, 2 * TILES B records, a few sa.
  // Rows past N read row N - 1 (their results are never stored), so no copy is predicated.
  static_assert(kRows == kThreads && 256 % kThreads == 0, "one scale row per thread");
  constexpr int kRowStep = kThreads / kStageChunks;
  const int cp_row = tid >> 3;
  const int cp_chunk = tid & 7;
  const int cp_dst = cp_row * 128 + ((cp_chunk ^ (cp_row & 7)) << 4);
  const uint32_t last_row = static_cast<uint32_t>(n - 1);
  const uint32_t kbytes32 = static_cast<uint32_t>(kbytes);
  const uint32_t kgroups32 = static_cast<uint32_t>(kgroups);

  auto issue_weights = [&](int64_t rb, int64_t st, int s) {
    uint8_t* codes = stage_ptr(s);
    const uint32_t row0 = static_cast<uint32_t>(rb * kRows);
    const uint8_t* base = a.w + st * (kStageChunks * 16) + cp_chunk * 16;
#pragma unroll
    for (int k = 0; k < kRows / kRowStep; ++k) {
      const uint32_t row = min(row0 + cp_row + k * kRowStep, last_row);
      cp_async16(codes + cp_dst + k * kRowStep * 128, base + static_cast<uint64_t>(row) * kbytes32, true);
    }
    const uint32_t srow = min(row0 + tid, last_row);
    const uint8_t* ssrc = a.ws + static_cast<uint64_t>(srow) * kgroups32 + st * L::kScaleRowBytes;
    uint8_t* sc = codes + L::kCodeBytes;
    if constexpr (kNv) {
      cp_async16(sc + tid * L::kScaleRowBytes, ssrc, true);
    } else {
      cp_async8(sc + tid * L::kScaleRowBytes, ssrc, true);
    }
  };

  const __half* b_thread = a.b + (tid >> 8) * kc * 256 + (tid & 255) * 8;  // idx = tid (+ kThreads k)
  auto issue_acts = [&](int64_t st, int s) {
    uint8_t* bs = stage_ptr(s) + L::kCodeBytes + L::kScaleBytes;
    const __half* src = b_thread + st * (kStageChunks * 256);
#pragma unroll
    for (int k = 0; k < TILES * 256 / kThreads; ++k) {
      const int idx = tid + k * kThreads;  // tile idx / 256, 16-byte unit idx % 256
      cp_async16(bs + (idx >> 8) * 4096 + (idx & 255) * 16,
                 src + ((k * kThreads) >> 8) * kc * 256 + ((k * kThreads) & 255) * 8, true);
    }
    if constexpr (!kNv) {
      if (tid < TILES * 16) {
        cp_async16(bs + L::kBBytes + tid * 16, a.sa + st * kStageChunks * TILES * 8 + tid * 4, true);
      }
    }
  };

  float acc[2][TILES][4];
#pragma unroll
  for (int f = 0; f < 2; ++f)
#pragma unroll
    for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[f][tt][i] = 0.0f;

  uint8_t* wscale = smem + STAGES * L::kStageBytes + warp * L::kWarpScaleBytes;
  const UnpackMasks masks = opaque_masks();

  auto compute = [&](int s) {
    const uint8_t* codes = stage_ptr(s);
    const uint8_t* sc = codes + L::kCodeBytes;
    const uint8_t* bs = sc + L::kScaleBytes;
    const float* sas = reinterpret_cast<const float*>(bs + L::kBBytes);
    // decode this warp's 32 rows of weight scales: lane L -> row 32 * warp + L, stored at [.][L % 8][L / 8]
    __syncwarp();
    {
      const int r = warp * 32 + lane;
      const int pos = (lane & 7) * 4 + (lane >> 3);
      if constexpr (!kNv) {
        uint2 raw = *reinterpret_cast<const uint2*>(sc + r * 8);
        float* ws = reinterpret_cast<float*>(wscale);
#pragma unroll
        for (int cc = 0; cc < kStageChunks; ++cc) {
          const uint32_t word = cc < 4 ? raw.x : raw.y;
          ws[cc * 32 + pos] = e8m0_value((word >> (8 * (cc & 3))) & 0xFFu);
        }
      } else {
        uint4 raw = *reinterpret_cast<const uint4*>(sc + r * 16);
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
        uint32_t* ws = reinterpret_cast<uint32_t*>(wscale);
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {  // bytes 2hh, 2hh+1 of the word: groups 4wi + 2hh, +1 (chunk 2wi + hh)
            uint32_t pair;
            const uint16_t bytes = static_cast<uint16_t>(words[wi] >> (16 * hh));
            asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(pair) : "h"(bytes));
            const int cc = 2 * wi + hh;
            const uint32_t s0 = __byte_perm(pair, 0u, 0x1010);  // (s, s) of group 2cc
            const uint32_t s1 = __byte_perm(pair, 0u, 0x3232);  // group 2cc + 1
            ws[(cc * 2 + 0) * 32 + pos] = s0;
            ws[(cc * 2 + 1) * 32 + pos] = s1;
          }
        }
      }
    }
    __syncwarp();
#pragma unroll
    for (int cc = 0; cc < kStageChunks; ++cc) {
      uint32_t q[4];
      {
        const int mat = lane >> 3;
        const int rr = lane & 7;
        const int r = warp * 32 + mat * 8 + rr;
        ldmatrix_x4(q, codes + r * 128 + ((cc ^ rr) << 4));
      }
      uint32_t u[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) unpack8(q[j], masks, u[j]);
      if constexpr (kNv) {
        const uint4 s4 = *reinterpret_cast<const uint4*>(wscale + ((cc * 2 + (t4 >> 1)) * 32 + g * 4) * 4);
        const uint32_t sj[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int h = 0; h < 4; ++h) u[j][h] = hmul2_u32(u[j][h], sj[j]);
      }
      uint4 bq[TILES];
#pragma unroll
      for (int tt = 0; tt < TILES; ++tt) bq[tt] = *reinterpret_cast<const uint4*>(bs + tt * 4096 + (cc * 32 + lane) * 16);
      float4 sw4;
      float2 sa2[TILES];
      if constexpr (!kNv) {
        sw4 = *reinterpret_cast<const float4*>(wscale + (cc * 32 + g * 4) * 4);
#pragma unroll
        for (int tt = 0; tt < TILES; ++tt) sa2[tt] = *reinterpret_cast<const float2*>(sas + (cc * TILES + tt) * 8 + 2 * t4);
      }
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        const uint32_t a0[4] = {u[2 * f][0], u[2 * f + 1][0], u[2 * f][2], u[2 * f + 1][2]};
        const uint32_t a1[4] = {u[2 * f][1], u[2 * f + 1][1], u[2 * f][3], u[2 * f + 1][3]};
#pragma unroll
        for (int tt = 0; tt < TILES; ++tt) {
          if constexpr (kNv) {
            mma16816(acc[f][tt], a0, bq[tt].x, bq[tt].y, acc[f][tt]);
            mma16816(acc[f][tt], a1, bq[tt].z, bq[tt].w, acc[f][tt]);
          } else {
            const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            float d[4];
            mma16816(d, a0, bq[tt].x, bq[tt].y, zero);
            mma16816(d, a1, bq[tt].z, bq[tt].w, d);
            const float swr0 = f == 0 ? sw4.x : sw4.z;  // rows g + 16f and g + 16f + 8
            const float swr1 = f == 0 ? sw4.y : sw4.w;
            acc[f][tt][0] = fmaf(d[0], __fmul_rn(swr0, sa2[tt].x), acc[f][tt][0]);
            acc[f][tt][1] = fmaf(d[1], __fmul_rn(swr0, sa2[tt].y), acc[f][tt][1]);
            acc[f][tt][2] = fmaf(d[2], __fmul_rn(swr1, sa2[tt].x), acc[f][tt][2]);
            acc[f][tt][3] = fmaf(d[3], __fmul_rn(swr1, sa2[tt].y), acc[f][tt][3]);
          }
        }
      }
    }
  };

  auto write_out = [&](int64_t rb, const float (&v)[2][TILES][4]) {
    const float gscale = __fmul_rn(*a.ga, *a.gw);
    const float pre = kNv ? 64.0f : 1.0f;  // NVFP4 operands carry 2^-6
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
      for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t row = rb * kRows + warp * 32 + f * 16 + g + 8 * (i >> 1);
          const int64_t tok = tt * 8 + 2 * t4 + (i & 1);
          if (row < n && tok < a.m) {
            float y = __fmul_rn(v[f][tt][i] * pre, gscale);
            if (a.bias != nullptr) y = __fadd_rn(y, a.bias[row]);
            const int64_t o = tok * n + row;
            if (a.out_dtype == 0) {
              static_cast<__nv_bfloat16*>(a.out)[o] = __float2bfloat16_rn(y);
            } else if (a.out_dtype == 1) {
              static_cast<__half*>(a.out)[o] = __float2half_rn(y);
            } else {
              static_cast<float*>(a.out)[o] = y;
            }
          }
        }
  };

  auto part_ptr = [&](int64_t cta, int slot) {
    return a.part + (cta * 2 + slot) * L::kPartPerCta + (warp * 32 + lane) * L::kElems;
  };

  auto flush = [&](int64_t rb, int64_t ua, int64_t ub) {
    const bool full = ua == rb * spr && ub == (rb + 1) * spr;
    if (full) {
      write_out(rb, acc);
    } else {
      float* dst = part_ptr(blockIdx.x, ua == u0 ? 0 : 1);
#pragma unroll
      for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int tt = 0; tt < TILES; ++tt)
          reinterpret_cast<float4*>(dst)[f * TILES + tt] =
              make_float4(acc[f][tt][0], acc[f][tt][1], acc[f][tt][2], acc[f][tt][3]);
      const int64_t cf = cta_of(rb * spr, units, ctas);
      const int64_t cl = cta_of((rb + 1) * spr - 1, units, ctas);
      __threadfence();
      __syncthreads();
      if (tid == 0) {
        const int prev = atomicAdd(a.counters + rb, 1);
        s_last = prev == static_cast<int>(cl - cf);
      }
      __syncthreads();
      if (s_last) {
        __threadfence();
        float v[2][TILES][4];
#pragma unroll
        for (int f = 0; f < 2; ++f)
#pragma unroll
          for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
            for (int i = 0; i < 4; ++i) v[f][tt][i] = 0.0f;
        for (int64_t c = cf; c <= cl; ++c) {
          const int slot = unit_start(c, units, ctas) < rb * spr ? 1 : 0;
          const float4* src = reinterpret_cast<const float4*>(part_ptr(c, slot));
#pragma unroll
          for (int f = 0; f < 2; ++f)
#pragma unroll
            for (int tt = 0; tt < TILES; ++tt) {
              const float4 p4 = __ldcg(src + f * TILES + tt);
              v[f][tt][0] += p4.x;
              v[f][tt][1] += p4.y;
              v[f][tt][2] += p4.z;
              v[f][tt][3] += p4.w;
            }
        }
        write_out(rb, v);
        if (tid == 0) a.counters[rb] = 0;
      }
    }
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
      for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[f][tt][i] = 0.0f;
  };

  // prologue: weights of the first STAGES-1 units (they do not depend on the act kernel), then wait for it
  int64_t rb0 = u0 / spr;
  int64_t st0 = u0 - rb0 * spr;
  int64_t iss_rb = rb0, iss_st = st0;  // next unit to load
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < count) {
      issue_weights(iss_rb, iss_st, s);
      if (++iss_st == spr) iss_st = 0, ++iss_rb;
    }
    cp_async_commit();
  }
  asm volatile("griddepcontrol.wait;" ::: "memory");
  {
    int64_t st = st0;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < count) {
        issue_acts(st, s);
        if (++st == spr) st = 0;
      }
    }
  }
  cp_async_commit();

  int64_t seg = u0;
  int64_t cur_rb = rb0, cur_st = st0;  // unit being computed
  for (int it = 0; it < count; ++it) {
    if (it == 0) {
      cp_async_wait<0>();
    } else {
      cp_async_wait<STAGES - 2>();
    }
    __syncthreads();
    if (it + STAGES - 1 < count) {
      const int s = (it + STAGES - 1) % STAGES;
      issue_weights(iss_rb, iss_st, s);
      issue_acts(iss_st, s);
      if (++iss_st == spr) iss_st = 0, ++iss_rb;
    }
    cp_async_commit();
    compute(it % STAGES);
    const int64_t u = u0 + it;
    if (++cur_st == spr || u + 1 == u1) {
#ifndef WUSH_DEC_SASS_COUNT  // instruction-count builds (tests/cuda/test_decode_build.py) leave the epilogue out
      flush(cur_rb, seg, u + 1);
#endif
      seg = u + 1;
    }
    if (cur_st == spr) cur_st = 0, ++cur_rb;
  }
#ifdef WUSH_DEC_SASS_COUNT
  {
    float* dst = part_ptr(blockIdx.x, 0);
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
      for (int tt = 0; tt < TILES; ++tt)
        reinterpret_cast<float4*>(dst)[f * TILES + tt] =
            make_float4(acc[f][tt][0], acc[f][tt][1], acc[f][tt][2], acc[f][tt][3]);
  }
#endif
  cp_async_wait<0>();
}

}  // namespace

#define WUSH_DEC_ACT(NAME, G, NV, TX)                                                               \
  extern "C" __global__ void __launch_bounds__(128) wush_dec_act_##NAME(const WushDecActArgs args) { \
    decode_act<G, NV, TX>(args);                                                                    \
  }

WUSH_DEC_ACT(mxfp4_fp32, 32, false, float)
WUSH_DEC_ACT(mxfp4_bf16, 32, false, __nv_bfloat16)
WUSH_DEC_ACT(mxfp4_fp16, 32, false, __half)
WUSH_DEC_ACT(nvfp4_fp32, 16, true, float)
WUSH_DEC_ACT(nvfp4_bf16, 16, true, __nv_bfloat16)
WUSH_DEC_ACT(nvfp4_fp16, 16, true, __half)

#define WUSH_DEC_GEMM(FMT, NV, TILES, NWARPS, STAGES)                                                      \
  extern "C" __global__ void __launch_bounds__(NWARPS * 32)                                                \
      wush_dec_gemm_##FMT##_t##TILES##_w##NWARPS##_s##STAGES(const WushDecGemmArgs args) {                 \
    decode_gemm<NV, TILES, NWARPS, STAGES>(args);                                                          \
  }

#define WUSH_DEC_GEMM_FMTS(TILES, NWARPS, STAGES) \
  WUSH_DEC_GEMM(mxfp4, false, TILES, NWARPS, STAGES) \
  WUSH_DEC_GEMM(nvfp4, true, TILES, NWARPS, STAGES)

WUSH_DEC_GEMM_FMTS(1, 4, 4)
WUSH_DEC_GEMM_FMTS(2, 4, 4)
WUSH_DEC_GEMM_FMTS(1, 4, 3)
WUSH_DEC_GEMM_FMTS(2, 4, 3)
