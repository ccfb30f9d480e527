"""Load the built cubins with cuda-python and launch their kernels on the current torch stream.

- A cubin is loaded once per process with ``cuLibraryLoadData`` (a context-independent library); each kernel
  is resolved once per device (``cuLibraryGetKernel`` + ``cuKernelGetFunction`` in that device's primary
  context, the one torch uses) and its dynamic shared-memory limit raised once.
- A CUTLASS GEMM's Params are built by its host library (``libwush_<source>.so``, ctypes) as opaque bytes and
  passed as the kernel's one parameter; the loader checks their size against the cubin
  (``cuKernelGetParamInfo``) so a host library and a cubin from different builds never meet.
- Launches go to ``torch.cuda.current_stream()`` with ``cuLaunchKernelEx`` (cluster dimensions when the
  variant has a cluster) and never synchronize the host, so they can be captured in a CUDA graph. The first
  call of a kernel on a device loads it: do it once before capturing (the usual warm-up).

Artifacts are found (:func:`find_artifacts`) in ``WUSH_CUDA_CUBIN_DIR`` (a build directory, or a directory of
per-architecture build directories), else in the package's ``prebuilt/`` and the user cache (:mod:`.builder`);
their file names carry the hash of the sources they were built from. If missing and the toolkit is present
they are built into the cache on first use, with a log line.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import settings
from . import builder as _build

logger = logging.getLogger(__name__)

__all__ = [
    "CudaUnavailable",
    "CudaLaunchError",
    "kernel_args",
    "WushGemmArgs",
    "WushKernelInfo",
    "WushQuantArgs",
    "arch_for_capability",
    "artifacts",
    "find_artifacts",
    "search_dirs",
    "driver",
    "gemm_kernel",
    "quantize_kernel",
    "launch",
    "cubin",
    "check_result",
    "sm_count",
]

ABI_VERSION = 1  # wush_gemm_abi.cuh WUSH_ABI_VERSION

#: Compute capability -> the architecture whose cubins run on it (arch-specific "a" targets run on exactly one).
_ARCH_OF_CAPABILITY = {cap: arch for arch, (cap, _) in _build.ARCHS.items()}


class CudaUnavailable(RuntimeError):
    """The cubin path cannot run here; the message says why and what would fix it."""


class CudaLaunchError(RuntimeError):
    """A kernel could not be prepared or launched (bad shape for the variant, driver error)."""


_C_TYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "i32": ctypes.c_int32}


def kernel_args(name: str, *groups: tuple[str, str]) -> type:
    """A ctypes struct mirroring a kernel's by-value argument struct, from groups of ("ptr" | "i64" | "i32",
    "field field ...") in declaration order (every launch struct of the CUDA kernels is made here)."""
    fields = [(field, _C_TYPES[kind]) for kind, names in groups for field in names.split()]
    return type(name, (ctypes.Structure,), {"_fields_": fields})


#: wush_gemm_abi.cuh's WushGemmArgs.
WushGemmArgs = kernel_args("WushGemmArgs", ("i64", "m n k"), ("ptr", "a b a_scale b_scale alpha_a alpha_b bias d"),
                           ("i32", "sm_count max_swizzle"))
#: transform_quantize.cu's argument struct.
WushQuantArgs = kernel_args("WushQuantArgs", ("ptr", "x t gs codes scales"), ("i64", "m k x_row_stride"),
                            ("i32", "swizzled reserved"))


class WushKernelInfo(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_int32),
        ("params_bytes", ctypes.c_int32),
        ("block", ctypes.c_int32 * 3),
        ("cluster", ctypes.c_int32 * 3),
        ("smem_bytes", ctypes.c_int32),
        ("min_cc", ctypes.c_int32),
        ("tile", ctypes.c_int32 * 3),
        ("align_k", ctypes.c_int32),
        ("align_n", ctypes.c_int32),
        ("sf_vec", ctypes.c_int32),
    ]


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of cuda:``index``."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def arch_for_capability(capability: tuple[int, int]) -> Optional[str]:
    """The build architecture whose cubins run on a device of this capability (None: none of ours)."""
    return _ARCH_OF_CAPABILITY.get(tuple(capability))


# ---------------------------------------------------------------- cuda-python


@functools.lru_cache(maxsize=None)
def driver() -> Any:
    """``cuda.bindings.driver`` (cuda-python 12.6+), or the older ``cuda.cuda`` module, initialized."""
    try:
        from cuda.bindings import driver as drv
    except ImportError:
        try:
            from cuda import cuda as drv  # cuda-python < 12.6
        except ImportError as exc:
            raise CudaUnavailable(
                "cuda-python is not installed (needed to load the cubins): pip install cuda-python"
            ) from exc
    try:
        result = drv.cuInit(0)
    except Exception as exc:  # cuda-python finds no driver library (no GPU driver installed)
        raise CudaUnavailable(f"cuda-python found no CUDA driver: {exc}") from exc
    check_result(drv, result, "cuInit")
    return drv


def check_result(drv: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python (err, *values) result, raising CudaLaunchError with the driver's error name."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        name = str(err)
        try:
            e2, text = drv.cuGetErrorName(err)
            if int(e2) == 0:
                name = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # the name is only decoration
            pass
        raise CudaLaunchError(f"{what} failed: {name} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# ---------------------------------------------------------------- artifacts


def search_dirs(arch: str) -> list[Path]:
    """Where artifacts for ``arch`` are looked for, in order: ``WUSH_CUDA_CUBIN_DIR`` (itself or its ``<arch>/``)
    when set, else the package's ``prebuilt/<arch>/`` and the user cache's ``<arch>-*`` directories."""
    env = settings.cubin_dir()
    if env:
        cands = [Path(env), Path(env) / arch]
    else:
        root = _build.cache_root()
        cached = sorted(root.glob(f"{arch}-*"), key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []
        cands = [Path(__file__).resolve().parent / "prebuilt" / arch, *cached]
    return [d for d in cands if d.is_dir()]


def find_artifacts(arch: str, targets: Sequence["_build.Target"]) -> tuple[Optional[Path], str]:
    """(directory, reason): the first search directory holding every one of ``targets`` (a host library and its
    cubins must come from one build). File names carry the sources' hash, so a hit is always current."""
    names = [t.filename for t in targets]
    dirs = search_dirs(arch)
    for d in dirs:
        if all((d / n).is_file() for n in names):
            return d, f"{arch} artifacts in {d}"
    where = ", ".join(map(str, dirs)) or "no directory"
    env = " (WUSH_CUDA_CUBIN_DIR)" if settings.cubin_dir() else ""
    return None, f"no {arch} build of these kernel sources ({', '.join(names)}) in {where}{env}"


_BUILD_LOCK = threading.Lock()


def artifacts(arch: str, targets: Sequence["_build.Target"]) -> Path:
    """The directory holding ``targets``, building them into the user cache on first use when the toolkit is
    here (with a warning: CUTLASS kernels take minutes); CudaUnavailable says why when neither works."""
    with _BUILD_LOCK:
        d, reason = find_artifacts(arch, targets)
        if d is not None:
            return d
        if settings.cubin_dir():
            raise CudaUnavailable(
                f"{reason}; rebuild with python -m wush_compile.cuda.build --arch {arch} --out "
                f"{settings.cubin_dir()}"
            )
        try:
            toolchain = _build.find_toolchain()
        except _build.BuildError as exc:
            raise CudaUnavailable(f"{reason}, and they cannot be built here: {exc}") from exc
        names = sorted({t.name for t in targets})
        logger.warning(
            "building the %s CUDA kernels %s on first use with nvcc %s (CUTLASS kernels take minutes; prebuild with "
            "`python -m wush_compile.cuda.build --arch %s`)", arch, names, toolchain.version_text, arch,
        )
        return _build.build([arch], only=names, toolchain=toolchain)[arch]


# ---------------------------------------------------------------- cubins


class _Cubin:
    """One cubin: loaded once per process, each kernel resolved once per device."""

    def __init__(self, path: Path):
        self.path = path
        self._library = None
        self._functions: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def function(self, name: str, device_index: int, smem_bytes: int, params_bytes: Optional[int]) -> Any:
        key = (name, device_index)
        fn = self._functions.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._functions.get(key)
            if fn is not None:
                return fn
            drv = driver()
            if self._library is None:
                data = self.path.read_bytes()
                self._library = check_result(drv, drv.cuLibraryLoadData(data, None, None, 0, None, None, 0),
                                       f"cuLibraryLoadData({self.path.name})")
                logger.info("loaded %s", self.path)
            kernel = check_result(drv, drv.cuLibraryGetKernel(self._library, name.encode()),
                            f"cuLibraryGetKernel({name}) in {self.path.name}")
            if params_bytes is not None:
                _check_param_size(drv, kernel, name, params_bytes)
            with torch.cuda.device(device_index):
                torch.cuda.current_stream()  # makes torch's primary context current on this thread
                fn = check_result(drv, drv.cuKernelGetFunction(kernel), f"cuKernelGetFunction({name})")
                if smem_bytes > 48 * 1024:
                    check_result(drv, drv.cuFuncSetAttribute(
                        fn, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(smem_bytes)),
                        f"cuFuncSetAttribute({name}, max dynamic shared memory = {smem_bytes})")
            self._functions[key] = fn
            return fn


def _check_param_size(drv: Any, kernel: Any, name: str, params_bytes: int) -> None:
    if not hasattr(drv, "cuKernelGetParamInfo"):
        return
    result = drv.cuKernelGetParamInfo(kernel, 0)
    if int(result[0]) != 0:  # drivers before 12.4 lack it: nothing to check against
        logger.debug("cuKernelGetParamInfo unavailable for %s (%s)", name, result[0])
        return
    size = int(result[2])
    if size != params_bytes:
        raise CudaLaunchError(
            f"{name}: the cubin's parameter is {size} bytes but the host library builds {params_bytes}; the two "
            "come from different builds - rebuild with python -m wush_compile.cuda.build --force"
        )


_CUBINS: dict[Path, _Cubin] = {}
_CUBINS_LOCK = threading.Lock()


def cubin(path: Path) -> _Cubin:
    """The cubin at ``path``, loaded once per process (kernels resolved per device on first use)."""
    with _CUBINS_LOCK:
        c = _CUBINS.get(path)
        if c is None:
            c = _CUBINS[path] = _Cubin(path)
        return c


_CONFIGS: dict[tuple, Any] = {}


def _launch_config(grid, block, smem_bytes: int, stream: int, cluster, pdl: bool = False) -> Any:
    """A CUlaunchConfig per (grid, block, shared memory, stream, cluster, pdl), built once (building one costs
    ~10 us). ``pdl`` adds programmatic stream serialization: the kernel may start before the previous one on the
    stream finishes and waits in ``griddepcontrol.wait``."""
    key = (tuple(grid), tuple(block), smem_bytes, stream, tuple(cluster), pdl)
    config = _CONFIGS.get(key)
    if config is not None:
        return config
    drv = driver()
    config = drv.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = (int(v) for v in grid)
    config.blockDimX, config.blockDimY, config.blockDimZ = (int(v) for v in block)
    config.sharedMemBytes = int(smem_bytes)
    config.hStream = drv.CUstream(int(stream))
    attrs = []
    if tuple(cluster) != (1, 1, 1):
        attr = drv.CUlaunchAttribute()
        attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = (int(v) for v in cluster)
        attrs.append(attr)
    if pdl:
        attr = drv.CUlaunchAttribute()
        attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        attrs.append(attr)
    if attrs:
        config.attrs = attrs
    config.numAttrs = len(attrs)
    if len(_CONFIGS) >= 1024:
        _CONFIGS.clear()
    _CONFIGS[key] = config
    return config


def launch(
    fn: Any,
    grid: Sequence[int],
    block: Sequence[int],
    smem_bytes: int,
    stream: int,
    params: "ctypes.Array | ctypes.Structure",
    cluster: Sequence[int] = (1, 1, 1),
    pdl: bool = False,
) -> None:
    """Launch ``fn`` with one by-value parameter whose bytes are ``params``, on the raw stream handle ``stream``
    (``pdl``: programmatic dependent launch, see :func:`_launch_config`)."""
    drv = driver()
    arg_ptrs = (ctypes.c_void_p * 1)(ctypes.addressof(params))
    config = _launch_config(grid, block, smem_bytes, stream, cluster, pdl)
    check_result(drv, drv.cuLaunchKernelEx(config, fn, ctypes.addressof(arg_ptrs), 0), "cuLaunchKernelEx")


# ---------------------------------------------------------------- host libraries and kernels


class _HostLibrary:
    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.wush_abi_version.restype = ctypes.c_int
        self.lib.wush_last_error.restype = ctypes.c_char_p
        got = self.lib.wush_abi_version()
        if got != ABI_VERSION:
            raise CudaLaunchError(f"{path.name} speaks ABI {got}, this loader {ABI_VERSION}; rebuild the kernels")
        size = self.lib.wush_gemm_args_bytes()
        if size != ctypes.sizeof(WushGemmArgs):
            raise CudaLaunchError(
                f"{path.name} reads WushGemmArgs of {size} bytes, the loader writes {ctypes.sizeof(WushGemmArgs)}"
            )

    def last_error(self) -> str:
        return (self.lib.wush_last_error() or b"").decode(errors="replace")

    def info(self, variant: str) -> WushKernelInfo:
        fn = getattr(self.lib, f"wush_{variant}_info")
        out = WushKernelInfo()
        if fn(ctypes.byref(out)) != 0:
            raise CudaLaunchError(f"wush_{variant}_info failed: {self.last_error()}")
        return out


@functools.lru_cache(maxsize=None)
def _host_library(path: Path) -> _HostLibrary:
    return _HostLibrary(path)


@dataclasses.dataclass
class GemmKernel:
    """A CUTLASS GEMM variant: host library (Params) + cubin (kernel)."""

    variant: str
    arch: str
    host: _HostLibrary
    cubin: _Cubin
    info: WushKernelInfo
    _prepared: "collections.OrderedDict[bytes, tuple[ctypes.Array, tuple[int, int, int]]]" = dataclasses.field(
        default_factory=collections.OrderedDict
    )

    _CACHE_SIZE = 512

    def prepare(self, args: WushGemmArgs) -> tuple[ctypes.Array, tuple[int, int, int]]:
        """(Params bytes, grid) for ``args``; memoized on the argument bytes (pointers and shapes)."""
        key = bytes(args)
        hit = self._prepared.get(key)
        if hit is not None:
            self._prepared.move_to_end(key)
            return hit
        params = ctypes.create_string_buffer(self.info.params_bytes)
        grid = (ctypes.c_int32 * 3)()
        workspace = ctypes.c_int64(0)
        fn = getattr(self.host.lib, f"wush_{self.variant}_prepare")
        rc = fn(ctypes.byref(args), params, ctypes.c_int64(self.info.params_bytes), grid, ctypes.byref(workspace))
        if rc != 0:
            hint = ""
            if rc == 5 and self.info.sf_vec:
                hint = ("; the packed-FP4 operands need tensor-map types that only sm_100 / sm_120 drivers encode "
                        "(on other GPUs this variant cannot run)")
            raise CudaLaunchError(f"{self.variant}: {self.host.last_error()} (code {rc}){hint}")
        hit = (params, (grid[0], grid[1], grid[2]))
        self._prepared[key] = hit
        if len(self._prepared) > self._CACHE_SIZE:
            self._prepared.popitem(last=False)
        return hit

    def run(self, args: WushGemmArgs, device_index: int, stream: int) -> None:
        params, grid = self.prepare(args)
        fn = self.cubin.function(f"wush_{self.variant}_kernel", device_index, self.info.smem_bytes,
                                 self.info.params_bytes)
        launch(fn, grid, tuple(self.info.block), self.info.smem_bytes, stream, params, tuple(self.info.cluster))


_GEMMS: dict[tuple[str, str], GemmKernel] = {}
_GEMMS_LOCK = threading.Lock()


def gemm_kernel(arch: str, variant: str) -> GemmKernel:
    """The GEMM ``variant`` (e.g. ``fp4_sm100_mxfp4_bf16``) for ``arch``, built on first use if needed."""
    key = (arch, variant)
    k = _GEMMS.get(key)
    if k is not None:
        return k
    with _GEMMS_LOCK:
        k = _GEMMS.get(key)
        if k is not None:
            return k
        by_name = {t.name: t for t in _build.targets(arch)}
        if variant not in by_name or by_name[variant].kind != "gemm":
            raise CudaUnavailable(f"no GEMM variant {variant!r} for {arch}; known: {sorted(by_name)}")
        target = by_name[variant]
        host_target = next(t for t in _build.targets(arch) if t.kind == "host")
        d = artifacts(arch, [target, host_target])
        host = _host_library(d / host_target.filename)
        info = host.info(variant)
        k = _GEMMS[key] = GemmKernel(variant, arch, host, cubin(d / target.filename), info)
        logger.info(
            "%s: tile %s, cluster %s, %d threads, %d B shared memory, %d B params",
            variant, tuple(info.tile), tuple(info.cluster), info.block[0], info.smem_bytes, info.params_bytes,
        )
        return k


_QUANT_FUNCS: dict[tuple[str, str, int], Any] = {}


def quantize_kernel(arch: str, name: str, device_index: int, smem_bytes: int) -> Any:
    """The transform+quantize kernel ``name`` (e.g. ``wush_tq_mxfp4_bf16``) on a device (cached)."""
    key = (arch, name, device_index)
    fn = _QUANT_FUNCS.get(key)
    if fn is None:
        target = next(t for t in _build.targets(arch) if t.kind == "quantize")
        d = artifacts(arch, [target])
        fn = cubin(d / target.filename).function(name, device_index, smem_bytes, ctypes.sizeof(WushQuantArgs))
        _QUANT_FUNCS[key] = fn
    return fn
