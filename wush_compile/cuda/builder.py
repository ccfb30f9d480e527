"""Reproducible ahead-of-time build of the CUDA kernels into cubins (plus the small host libraries that build
the CUTLASS kernels' launch parameters). The command line is :mod:`wush_compile.cuda.build`:

    python -m wush_compile.cuda.build [--arch sm_100a sm_120a sm_90a] [--out DIR] [--only NAME ...] [--jobs N]

What is built, per architecture (see :func:`targets`):

- ``<variant>.<arch>.<hash>.cubin`` (+ ``.ptx``): one CUTLASS GEMM variant each, e.g. ``fp4_sm100_mxfp4_bf16`` (block-
  scaled MXFP4 / NVFP4 GEMMs for sm_100a and sm_120a), holding one ``extern "C"`` kernel ``wush_<variant>_kernel``.
- ``libwush_<source>.<arch>.<hash>.so`` (sm_100a, sm_120a): the host half of one GEMM source (``wush_<variant>_info`` /
  ``_prepare``), built from the same text with ``-DWUSH_HOST_ONLY``; it runs CUTLASS's own host code to fill
  the kernel's Params (TMA descriptors included), taking cuTensorMapEncodeTiled from the driver the process
  has loaded; it calls no CUDA runtime API.
- ``transform_quantize.<arch>.<hash>.cubin``: the fused per-block transform + FP4 quantize kernels (plain CUDA).
- ``decode_sm90.sm_90a.<hash>.cubin`` (sm_90a only): the decode (M <= 16) act + GEMM kernels of
  :mod:`wush_compile.cuda.decode` (plain CUDA, no CUTLASS).

Every file name carries a hash of exactly the sources, defines and flags it is built from
(:attr:`Target.filename`), so an edited kernel never meets an old artifact and unchanged ones stay valid.
Artifacts land in a cache directory keyed by the nvcc and CUTLASS versions and the architecture
(:func:`cache_dir`), each file written atomically, so concurrent and partial builds are safe.
``WUSH_CUDA_CACHE`` moves the cache root; ``WUSH_NVCC`` / ``CUDA_HOME`` pick the compiler;
``WUSH_CUTLASS_INCLUDE`` the CUTLASS headers (default: the ``nvidia-cutlass`` pip package).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from .. import settings

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHS",
    "BuildError",
    "Toolchain",
    "Target",
    "find_nvcc",
    "find_cutlass_include",
    "find_cuobjdump",
    "find_toolchain",
    "source_hash",
    "cache_root",
    "cache_dir",
    "targets",
    "build",
]

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"

#: Architectures the package builds for, their compute capability, and the oldest nvcc that targets them.
ARCHS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "sm_90a": ((9, 0), (12, 0)),
    "sm_100a": ((10, 0), (12, 8)),
    "sm_120a": ((12, 0), (12, 8)),
}
DEFAULT_ARCHS = ("sm_100a", "sm_120a")

#: Bump when the flags or the artifact layout change (part of the cache key).
BUILD_RECIPE_VERSION = 1
_COMMON_FLAGS = ("-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DNDEBUG")
_HOST_FLAGS = ("-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden,-O2", "-ldl")

# Output dtype code (WUSH_OUT) per torch dtype name; formats per WUSH_FMT.
OUT_CODES = {"bf16": 0, "fp16": 1, "fp32": 2}
FMT_CODES = {"mxfp4": 0, "nvfp4": 1}
#: The block-scaled FP4 GEMM source of each architecture that has one (sm_90a has the decode kernels only).
_GEMM_SOURCES = {
    "sm_100a": "fp4_gemm_sm100.cu",
    "sm_120a": "fp4_gemm_sm120.cu",
}
QUANTIZE_SOURCE = "transform_quantize.cu"
#: Hopper decode kernels (wush_compile.cuda.decode), built for sm_90a only.
DECODE_SOURCE = "decode_sm90.cu"


class BuildError(RuntimeError):
    """The CUDA build cannot run or failed; the message names the missing piece and the fix."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
    nvcc: Path
    version: tuple[int, int]
    version_text: str  # e.g. "13.0.88"
    cutlass_include: Path
    cutlass_version: str

    def supports(self, arch: str) -> bool:
        return self.version >= ARCHS[arch][1]


@dataclasses.dataclass(frozen=True)
class Target:
    """One artifact: a GEMM variant cubin, a GEMM source's host library, or the quantize cubin."""

    kind: str  # "gemm" | "host" | "quantize" | "decode"
    name: str  # variant name, source stem, or "transform_quantize"
    arch: str
    source: str
    defines: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The kernel files this artifact is compiled from (the GEMMs include the shared headers)."""
        if self.kind in ("quantize", "decode"):
            return (self.source,)
        return (self.source, *sorted(p.name for p in KERNEL_DIR.glob("*.cuh")))

    @property
    def content_hash(self) -> str:
        """16 hex digits over the build recipe, the arch, the defines and the bytes of every input file."""
        return _content_hash(self.kind, self.arch, self.defines, self.inputs)

    @property
    def filename(self) -> str:
        """``<name>.<arch>.<hash>.cubin`` / ``libwush_<name>.<arch>.<hash>.so``: a changed source never meets an
        old artifact, and unchanged artifacts stay valid across edits of other kernels."""
        if self.kind == "host":
            return f"libwush_{self.name}.{self.arch}.{self.content_hash}.so"
        return f"{self.name}.{self.arch}.{self.content_hash}.cubin"

    @property
    def ptx_filename(self) -> Optional[str]:
        return None if self.kind == "host" else self.filename[: -len(".cubin")] + ".ptx"


def _content_hash(kind: str, arch: str, defines: tuple[str, ...], inputs: tuple[str, ...]) -> str:
    stamp = tuple((n, (KERNEL_DIR / n).stat().st_mtime_ns, (KERNEL_DIR / n).stat().st_size) for n in inputs)
    return _content_hash_cached(kind, arch, defines, stamp)


@functools.lru_cache(maxsize=256)
def _content_hash_cached(kind: str, arch: str, defines: tuple[str, ...], stamp: tuple) -> str:
    flags = _HOST_FLAGS if kind == "host" else ()
    h = hashlib.sha256(f"recipe={BUILD_RECIPE_VERSION};{_COMMON_FLAGS};{flags};{kind};{arch};{defines}".encode())
    for name, _, _ in stamp:
        h.update(name.encode() + b"\0" + (KERNEL_DIR / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def gemm_variant_name(arch: str, fmt: str, out: str) -> str:
    """``fp4_sm100_mxfp4_bf16``, ``fp4_sm120_nvfp4_fp32``, ..."""
    family = arch.split("_")[1].rstrip("a")
    return f"fp4_sm{family}_{fmt}_{out}"


def targets(arch: str) -> list[Target]:
    """Everything built for ``arch``: the GEMM variants, their host library and the quantize kernels."""
    if arch not in ARCHS:
        raise BuildError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
    source = _GEMM_SOURCES.get(arch)
    out: list[Target] = []
    if source is not None:
        for fmt in FMT_CODES:
            for dt, code in OUT_CODES.items():
                name = gemm_variant_name(arch, fmt, dt)
                defines = (f"-DWUSH_VARIANT={name}", f"-DWUSH_OUT={code}", f"-DWUSH_FMT={FMT_CODES[fmt]}")
                out.append(Target("gemm", name, arch, source, defines))
        out.append(Target("host", Path(source).stem, arch, source, ("-DWUSH_HOST_ONLY",)))
    out.append(Target("quantize", "transform_quantize", arch, QUANTIZE_SOURCE))
    if arch == "sm_90a":
        out.append(Target("decode", Path(DECODE_SOURCE).stem, arch, DECODE_SOURCE))
    return out


# ---------------------------------------------------------------- toolchain discovery


def find_nvcc() -> Path:
    """nvcc from ``WUSH_NVCC``, ``CUDA_HOME``/``CUDA_PATH``, ``PATH``, /usr/local/cuda; BuildError if none."""
    tried = []
    env = settings.value("WUSH_NVCC")
    candidates = [Path(env)] if env else []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if settings.value(var):
            candidates.append(Path(settings.value(var)) / "bin" / "nvcc")
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which))
    candidates += [Path("/usr/local/cuda/bin/nvcc"), Path("/usr/local/bin/nvcc")]
    for c in candidates:
        tried.append(str(c))
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise BuildError(
        "the CUDA toolkit's nvcc was not found (tried: " + ", ".join(tried) + "). Install the CUDA toolkit "
        "(12.8 or newer for sm_100a / sm_120a) and put nvcc on PATH, or set WUSH_NVCC=/path/to/nvcc"
    )


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> tuple[tuple[int, int], str]:
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"could not run {nvcc} --version: {exc}") from exc
    m = re.search(r"release (\d+)\.(\d+), V([\d.]+)", text)
    if not m:
        raise BuildError(f"could not read the CUDA version from `{nvcc} --version`: {text.strip()!r}")
    return (int(m.group(1)), int(m.group(2))), m.group(3)


def find_cuobjdump() -> Optional[Path]:
    """cuobjdump from the toolkit beside nvcc, PATH, /usr/local/cuda*, or the copy triton ships (None if absent)."""
    candidates = []
    try:
        candidates.append(find_nvcc().resolve().parent / "cuobjdump")
    except BuildError:
        pass
    which = shutil.which("cuobjdump")
    if which:
        candidates.append(Path(which))
    candidates += sorted(Path("/usr/local").glob("cuda*/bin/cuobjdump"), reverse=True)
    try:
        import triton

        candidates.append(Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def find_cutlass_include() -> Path:
    """CUTLASS's include directory: ``WUSH_CUTLASS_INCLUDE`` or the ``nvidia-cutlass`` package's headers."""
    env = settings.value("WUSH_CUTLASS_INCLUDE")
    if env:
        p = Path(env)
        if not (p / "cutlass" / "cutlass.h").is_file():
            raise BuildError(f"WUSH_CUTLASS_INCLUDE={env} does not contain cutlass/cutlass.h")
        return p
    try:
        import cutlass_library  # the nvidia-cutlass pip package ships the headers beside it
    except ImportError as exc:
        raise BuildError(
            "the CUTLASS headers were not found: install the `nvidia-cutlass` package (pip install "
            "'wush_compile[dev]' or pip install nvidia-cutlass) or set WUSH_CUTLASS_INCLUDE to CUTLASS's include/"
        ) from exc
    p = Path(cutlass_library.__file__).resolve().parent / "source" / "include"
    if not (p / "cutlass" / "cutlass.h").is_file():
        raise BuildError(f"the nvidia-cutlass package has no headers at {p}; reinstall it or set WUSH_CUTLASS_INCLUDE")
    return p


def _cutlass_version(include: Path) -> str:
    text = (include / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{k} (\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


def find_toolchain() -> Toolchain:
    """nvcc and the CUTLASS headers, or a BuildError naming what is missing and how to get it."""
    nvcc = find_nvcc()
    version, text = _nvcc_version(str(nvcc))
    include = find_cutlass_include()
    if version < (12, 0):
        raise BuildError(f"{nvcc} is CUDA {text}; the kernels need CUDA 12.0+ (12.8+ for sm_100a / sm_120a)")
    return Toolchain(nvcc, version, text, include, _cutlass_version(include))


# ---------------------------------------------------------------- cache


def source_hash() -> str:
    """sha256 over the kernel sources (names and bytes) and the build recipe."""
    h = hashlib.sha256(f"recipe={BUILD_RECIPE_VERSION};{_COMMON_FLAGS};{_HOST_FLAGS}".encode())
    for p in sorted(KERNEL_DIR.iterdir()):
        if p.suffix in (".cu", ".cuh"):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def cache_root() -> Path:
    env = settings.value("WUSH_CUDA_CACHE")
    if env:
        return Path(env)
    base = settings.value("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wush_compile" / "cuda"


def cache_key(arch: str, toolchain: Toolchain) -> str:
    return f"{arch}-cuda{toolchain.version_text}-cutlass{toolchain.cutlass_version}"


def cache_dir(arch: str, toolchain: Toolchain, root: Optional[Path] = None) -> Path:
    """Where the user cache keeps ``arch``'s artifacts built by this toolchain (file names carry the sources'
    hash, so one directory serves every version of the kernels)."""
    return (root or cache_root()) / cache_key(arch, toolchain)


# ---------------------------------------------------------------- compiling


def _gencode(arch: str, code: str) -> list[str]:
    cc = arch.split("_")[1]
    return ["-gencode", f"arch=compute_{cc},code={code}_{cc}"]


def _run(cmd: list[str], what: str) -> None:
    logger.debug("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-40:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{tail}")


def _compile(target: Target, toolchain: Toolchain, out_dir: Path) -> Path:
    """Compile one target into ``out_dir`` (atomically: temp file, then rename)."""
    dest = out_dir / target.filename
    src = KERNEL_DIR / target.source
    includes = ["-I", str(KERNEL_DIR), "-I", str(toolchain.cutlass_include)]
    nvcc = str(toolchain.nvcc)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=out_dir) as tmp:
        tmp_dest = Path(tmp) / target.filename
        if target.kind == "host":
            cmd = [nvcc, *_COMMON_FLAGS, *_gencode(target.arch, "compute"), *includes, *target.defines,
                   *_HOST_FLAGS, "-o", str(tmp_dest), str(src)]
            _run(cmd, f"host library {target.filename}")
        else:
            # PTX first (kept beside the cubin for inspection), then ptxas through nvcc.
            ptx = Path(tmp) / target.ptx_filename
            _run([nvcc, *_COMMON_FLAGS, *_gencode(target.arch, "compute"), *includes, *target.defines, "-ptx",
                  "-o", str(ptx), str(src)], f"{target.name} for {target.arch} (ptx)")
            _run([nvcc, *_gencode(target.arch, "sm"), "-cubin", "-o", str(tmp_dest), str(ptx)],
                 f"{target.name} for {target.arch} (ptxas)")
            os.replace(ptx, out_dir / ptx.name)
        os.replace(tmp_dest, dest)
    return dest


def _write_manifest(out_dir: Path, arch: str, toolchain: Toolchain) -> None:
    """An informational manifest.json: who built what (the loader trusts only the hashed file names)."""
    manifest = {
        "arch": arch,
        "cuda_version": toolchain.version_text,
        "cutlass_version": toolchain.cutlass_version,
        "recipe": BUILD_RECIPE_VERSION,
        "files": sorted(p.name for p in out_dir.iterdir() if p.suffix in (".cubin", ".so")),
    }
    tmp = out_dir / f".manifest.{os.getpid()}.json"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / "manifest.json")


def build(
    archs: Iterable[str] = DEFAULT_ARCHS,
    out: Optional[Path] = None,
    only: Optional[Iterable[str]] = None,
    jobs: Optional[int] = None,
    force: bool = False,
    toolchain: Optional[Toolchain] = None,
) -> dict[str, Path]:
    """Build (or find already built) artifacts for each architecture; returns {arch: directory}.

    ``out``: put the artifacts in ``out/<arch>/`` instead of the keyed cache (``WUSH_CUDA_CUBIN_DIR=out`` then
    finds them).
    ``only``: target names to build (variant names such as ``fp4_sm100_mxfp4_bf16``, a host library's source stem such
    as ``fp4_gemm_sm100``, or ``transform_quantize``); default everything.
    """
    toolchain = toolchain or find_toolchain()
    archs = list(dict.fromkeys(archs))
    for arch in archs:
        if arch not in ARCHS:
            raise BuildError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
        if not toolchain.supports(arch):
            need = ".".join(map(str, ARCHS[arch][1]))
            raise BuildError(
                f"nvcc {toolchain.version_text} ({toolchain.nvcc}) cannot target {arch}; it needs CUDA {need} or "
                "newer. Install a newer CUDA toolkit or set WUSH_NVCC"
            )
    wanted = set(only) if only else None
    work: list[tuple[Target, Path]] = []
    dirs: dict[str, Path] = {}
    for arch in archs:
        d = Path(out) / arch if out is not None else cache_dir(arch, toolchain)
        d.mkdir(parents=True, exist_ok=True)
        dirs[arch] = d
        arch_targets = targets(arch)
        if wanted is not None:
            known = {t.name for t in arch_targets}
            arch_targets = [t for t in arch_targets if t.name in wanted]
            if not arch_targets:
                raise BuildError(f"--only {sorted(wanted)} matches nothing for {arch}; known: {sorted(known)}")
        for t in arch_targets:
            if force or not (d / t.filename).is_file():
                work.append((t, d))
    if work:
        n = jobs or max(1, os.cpu_count() or 1)
        logger.info(
            "building %d CUDA artifact(s) with nvcc %s, CUTLASS %s, %d job(s): %s",
            len(work), toolchain.version_text, toolchain.cutlass_version, n, ", ".join(t.filename for t, _ in work),
        )
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            futures = {pool.submit(_timed_compile, t, toolchain, d): t for t, d in work}
            errors = []
            for fut in concurrent.futures.as_completed(futures):
                try:
                    fut.result()
                except BuildError as exc:
                    errors.append(str(exc))
        if errors:
            raise BuildError("\n\n".join(errors))
        logger.info("CUDA build finished in %.1f s", time.monotonic() - start)
    for arch, d in dirs.items():
        _write_manifest(d, arch, toolchain)
    return dirs


def _timed_compile(target: Target, toolchain: Toolchain, out_dir: Path) -> Path:
    start = time.monotonic()
    path = _compile(target, toolchain, out_dir)
    logger.info("built %s in %.1f s", path.name, time.monotonic() - start)
    return path
