// The C ABI between a CUTLASS GEMM source and wush_compile/cuda/loader.py.
//
// Each GEMM source (fp4_gemm_sm100.cu, fp4_gemm_sm120.cu, fp8_gemm_sm90.cu) is compiled in two ways:
//   * device pass, once per variant (-DWUSH_VARIANT=<name> plus the variant's -D flags): `nvcc -ptx` for one
//     architecture, then ptxas; the cubin holds one `extern "C"` kernel, `wush_<name>_kernel(Params)`, which
//     the loader launches with cuda-python (cuLaunchKernel).
//   * host pass, once per source (-DWUSH_HOST_ONLY): a shared library with `extern "C"` functions
//     wush_<name>_info / wush_<name>_prepare for every variant of the source, which build the kernel's Params
//     from WushGemmArgs with CUTLASS's own host code (TMA descriptors included) and report the grid, the
//     block, the cluster and the shared memory the launch needs.
// The loader reads Params as opaque bytes and passes them as the kernel's single parameter, so no CUTLASS
// type is mirrored in Python. Keep WushGemmArgs / WushKernelInfo in sync with loader.py (WUSH_ABI_VERSION).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>

#define WUSH_ABI_VERSION 1

// The host library is built with -fvisibility=hidden; only these symbols are exported.
#define WUSH_EXPORT __attribute__((visibility("default")))

#ifdef WUSH_HOST_ONLY
// CUTLASS's host code calls cuTensorMapEncodeTiled directly; the definition below resolves it at run time.
#define CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL 1
#endif

extern "C" {

// One GEMM call: D (M, N) row-major = epilogue(A (M, K) . B (N, K)^T). Pointers are device pointers.
struct WushGemmArgs {
  int64_t m, n, k;      // K counts elements (fp4 values or fp8 values), not bytes
  const void* a;        // A, K-major
  const void* b;        // B, K-major (the weight, (N, K) row-major)
  const void* a_scale;  // fp4: A's scale bytes in the 128x4 swizzled layout; fp8: (M,) fp32 row scales
  const void* b_scale;  // fp4: B's swizzled scale bytes; fp8: (N,) fp32 row scales of the weight
  const float* alpha_a; // fp32 device scalar (activation global scale)
  const float* alpha_b; // fp32 device scalar (weight global scale)
  const float* bias;    // (N,) fp32, or null for no bias
  void* d;              // output
  int32_t sm_count;     // multiprocessors of the device (persistent tile schedulers size the grid by it)
  int32_t max_swizzle;  // tile rasterization swizzle (0 = CUTLASS default)
};

// Static facts about a compiled variant.
struct WushKernelInfo {
  int32_t abi_version;
  int32_t params_bytes;   // sizeof(GemmKernel::Params), the kernel's one parameter
  int32_t block[3];
  int32_t cluster[3];
  int32_t smem_bytes;     // dynamic shared memory of one CTA
  int32_t min_cc;         // the architecture tag's compute capability (90, 100, 120)
  int32_t tile[3];        // the CTA tile (M, N, K)
  int32_t align_k;        // K must be a multiple of this
  int32_t align_n;        // N must be a multiple of this (output and bias rows of 16 bytes)
  int32_t sf_vec;         // elements per scale factor (0: no block scales)
};

}  // extern "C"

namespace wush {

// Per-thread message of the last failed host call, read by the loader through wush_<variant>_last_error().
inline char* last_error_buffer() {
  static thread_local char buffer[512] = {0};
  return buffer;
}

inline int fail(int code, const char* fmt, long long a = 0, long long b = 0, long long c = 0) {
  std::snprintf(last_error_buffer(), 512, fmt, a, b, c);
  return code;
}

}  // namespace wush

#ifdef WUSH_HOST_ONLY
#include <cuda.h>
#include <dlfcn.h>

// cuTensorMapEncodeTiled for CUTLASS's host code (built with CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL): resolved
// from the driver library the process already has loaded (torch loads it), so the host library needs neither
// the CUDA runtime nor a link-time libcuda, and a failed encode is reported instead of only printed.
namespace wush {
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
inline EncodeTiledFn resolve_encode_tiled() {
  static EncodeTiledFn fn = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    return lib == nullptr ? nullptr : reinterpret_cast<EncodeTiledFn>(dlsym(lib, "cuTensorMapEncodeTiled"));
  }();
  return fn;
}
inline int& encode_failures() {
  static thread_local int count = 0;
  return count;
}
}  // namespace wush

extern "C" CUresult CUDAAPI cuTensorMapEncodeTiled(
    CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* address, const cuuint64_t* dims,
    const cuuint64_t* strides, const cuuint32_t* box, const cuuint32_t* element_strides,
    CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2,
    CUtensorMapFloatOOBfill oob) {
  wush::EncodeTiledFn fn = wush::resolve_encode_tiled();
  if (fn == nullptr) {
    ++wush::encode_failures();
    return CUDA_ERROR_NOT_INITIALIZED;
  }
  CUresult rc = fn(map, dtype, rank, address, dims, strides, box, element_strides, interleave, swizzle, l2, oob);
  if (rc != CUDA_SUCCESS) ++wush::encode_failures();
  return rc;
}

extern "C" WUSH_EXPORT const char* wush_last_error() { return wush::last_error_buffer(); }
extern "C" WUSH_EXPORT int wush_abi_version() { return WUSH_ABI_VERSION; }
extern "C" WUSH_EXPORT int wush_gemm_args_bytes() { return static_cast<int>(sizeof(WushGemmArgs)); }
#endif  // WUSH_HOST_ONLY

// The device entry point of variant NAME: a plain C symbol, wush_<NAME>_kernel, that the loader finds with
// cuLibraryGetKernel. Same body as cutlass::device_kernel, without the template in the symbol.
#define WUSH_DEFINE_KERNEL(NAME, ...) WUSH_DEFINE_KERNEL_(NAME, __VA_ARGS__)
#define WUSH_DEFINE_KERNEL_(NAME, ...)                                                                     \
  extern "C" __global__ void __launch_bounds__(__VA_ARGS__::MaxThreadsPerBlock,                           \
                                               __VA_ARGS__::MinBlocksPerMultiprocessor)                    \
  wush_##NAME##_kernel(CUTLASS_GRID_CONSTANT typename __VA_ARGS__::Params const params) {                  \
    extern __shared__ char smem[];                                                                         \
    __VA_ARGS__ op;                                                                                        \
    op(params, smem);                                                                                      \
  }

// Host functions of variant NAME (built with -DWUSH_HOST_ONLY). Config provides GemmKernel, kMinCC,
// kAlignK, kAlignN, kSfVec and `static int make_arguments(WushGemmArgs const&, GemmKernel::Arguments&)`.
#define WUSH_DEFINE_HOST(NAME, ...)                                                                        \
  extern "C" WUSH_EXPORT int wush_##NAME##_info(WushKernelInfo* info) {                                    \
    return wush::kernel_info<__VA_ARGS__>(info);                                                           \
  }                                                                                                        \
  extern "C" WUSH_EXPORT int wush_##NAME##_prepare(WushGemmArgs const* args, void* params_out,             \
                                                   int64_t params_cap, int32_t* grid, int64_t* workspace) { \
    return wush::prepare<__VA_ARGS__>(args, params_out, params_cap, grid, workspace);                      \
  }

