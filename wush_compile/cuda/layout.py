"""Scale-factor layout and launch parameters of the CUDA kernels (pure Python / torch; unit-tested on the CPU).

The 128x4 swizzled scale layout
-------------------------------
Block-scaled tensor-core GEMMs (sm_100 tcgen05, sm_120 mma .block_scale; cuBLAS "1D block scaling factors
layout", CUTLASS ``Sm1xxBlockScaledConfig``) read the scale bytes of a (rows, K/G) scale matrix in tiles of
128 rows x 4 scale columns. The matrix is padded to ``ceil(rows/128)*128`` rows and ``ceil(K/G/4)*4``
columns; tile (i, j) (i over row tiles, j over column tiles) is stored at byte ``(i * col_tiles + j) * 512``,
column tiles fastest; inside a tile, scale (r, c) (r < 128, c < 4) sits at ``(r % 32) * 16 + (r // 32) * 4 + c``:
32 lines of 16 bytes, line ``r % 32`` holding rows r, r+32, r+64, r+96, four scales each.

Padding must hold a finite scale (zero here): the MMA multiplies the padded K columns' scales with the
zero-filled out-of-bounds codes, and a NaN scale (e8m0 0xFF) would turn 0 * scale into NaN.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import Format

__all__ = [
    "SF_TILE_ROWS",
    "SF_TILE_COLS",
    "SF_TILE_BYTES",
    "swizzled_scale_shape",
    "swizzled_scale_numel",
    "swizzled_offsets",
    "to_swizzled",
    "from_swizzled",
    "QuantizeLaunch",
    "quantize_launch",
    "GEMM_ALIGN_K",
    "output_alignment",
    "check_gemm_shape",
]

SF_TILE_ROWS = 128
SF_TILE_COLS = 4
SF_TILE_BYTES = SF_TILE_ROWS * SF_TILE_COLS
_LINES = 32  # 16-byte lines per tile; a line holds rows r, r + 32, r + 64, r + 96

#: K must be a multiple of this for the FP4 GEMMs: 32 e2m1 values are the 16-byte TMA row granularity.
GEMM_ALIGN_K = 32


def _ceil_to(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def swizzled_scale_shape(rows: int, kgroups: int) -> tuple[int, int]:
    """(padded rows, padded scale columns) of the swizzled buffer for a (rows, kgroups) scale matrix."""
    if rows < 0 or kgroups < 0:
        raise ValueError(f"scale matrix shape must be non-negative, got ({rows}, {kgroups})")
    return _ceil_to(rows, SF_TILE_ROWS), _ceil_to(kgroups, SF_TILE_COLS)


def swizzled_scale_numel(rows: int, kgroups: int) -> int:
    """Bytes of the swizzled buffer (padding included)."""
    r, c = swizzled_scale_shape(rows, kgroups)
    return r * c


def swizzled_offsets(rows: int, kgroups: int, device=None) -> torch.Tensor:
    """(rows, kgroups) int64: the byte offset of every scale in the swizzled buffer."""
    col_tiles = swizzled_scale_shape(rows, kgroups)[1] // SF_TILE_COLS
    r = torch.arange(rows, dtype=torch.int64, device=device).unsqueeze(1)  # (rows, 1)
    c = torch.arange(kgroups, dtype=torch.int64, device=device).unsqueeze(0)  # (1, kgroups)
    tile = (r // SF_TILE_ROWS) * col_tiles + c // SF_TILE_COLS  # (rows, kgroups)
    rr = r % SF_TILE_ROWS
    return tile * SF_TILE_BYTES + (rr % _LINES) * 16 + (rr // _LINES) * SF_TILE_COLS + c % SF_TILE_COLS


def to_swizzled(scales: torch.Tensor) -> torch.Tensor:
    """(rows, kgroups) uint8 scales -> 1-D uint8 buffer in the 128x4 swizzled layout, zero padded."""
    if scales.dim() != 2 or scales.dtype != torch.uint8:
        raise ValueError(f"to_swizzled expects a 2-D uint8 scale matrix, got {scales.dtype} {tuple(scales.shape)}")
    rows, kgroups = scales.shape
    out = torch.zeros(swizzled_scale_numel(rows, kgroups), dtype=torch.uint8, device=scales.device)
    out[swizzled_offsets(rows, kgroups, scales.device).reshape(-1)] = scales.reshape(-1)
    return out


def from_swizzled(buf: torch.Tensor, rows: int, kgroups: int) -> torch.Tensor:
    """Inverse of :func:`to_swizzled`: the (rows, kgroups) scales held in a swizzled buffer."""
    need = swizzled_scale_numel(rows, kgroups)
    if buf.dtype != torch.uint8 or buf.numel() != need:
        raise ValueError(
            f"a swizzled buffer for ({rows}, {kgroups}) scales is {need} uint8 bytes, got {buf.dtype} "
            f"with {buf.numel()} elements"
        )
    return buf.reshape(-1)[swizzled_offsets(rows, kgroups, buf.device).reshape(-1)].reshape(rows, kgroups)


# ---------------------------------------------------------------- launch parameters


@dataclasses.dataclass(frozen=True)
class QuantizeLaunch:
    """Grid, block and dynamic shared memory of the transform+quantize kernel."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem_bytes: int
    kernel: str


_MAX_QUANT_ROWS = 128  # the kernels' __launch_bounds__
_MIN_QUANT_ROWS = 32  # one warp


def quantize_launch(m: int, k: int, fmt: Format | str, x_dtype: torch.dtype, has_transform: bool) -> QuantizeLaunch:
    """One thread per (row, group): CTAs of 32..128 rows (the smallest power of two >= M, so decode rows do not
    leave most of a CTA idle); grid x over the K/G groups (fastest, so resident CTAs read neighbouring bytes of
    the same rows), grid y over the row tiles; the (G, G) fp32 block transform in shared memory."""
    f = Format.parse(fmt)
    g = f.group_size
    if m < 1 or k < 1 or k % g:
        raise ValueError(
            f"transform_quantize: need M >= 1 and K a positive multiple of {g} for {f.value}, got M={m}, K={k}"
        )
    rows = _MIN_QUANT_ROWS
    while rows < min(m, _MAX_QUANT_ROWS):
        rows *= 2
    row_tiles = (m + rows - 1) // rows
    if row_tiles > 65535 or k // g > 2**31 - 1:
        raise ValueError(
            f"transform_quantize: M={m} exceeds the launch grid (at most {65535 * rows} rows per call); split the rows"
        )
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if x_dtype not in names:
        raise ValueError(f"transform_quantize: activations must be float32, bfloat16 or float16, got {x_dtype}")
    return QuantizeLaunch(
        grid=(k // g, row_tiles, 1),
        block=(rows, 1, 1),
        smem_bytes=g * g * 4 if has_transform else 0,
        kernel=f"wush_tq_{f.value}_{names[x_dtype]}",
    )


def output_alignment(out_dtype: torch.dtype) -> int:
    """N must be a multiple of this: output rows are stored by TMA in 16-byte units."""
    sizes = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
    if out_dtype not in sizes:
        raise ValueError(f"CUTLASS GEMM output must be bfloat16, float16 or float32, got {out_dtype}")
    return 16 // sizes[out_dtype]


def check_gemm_shape(m: int, n: int, k: int, out_dtype: torch.dtype, align_k: int = GEMM_ALIGN_K) -> None:
    """Raise ValueError naming the bad dimension when the CUTLASS GEMMs cannot run (M, N, K) -> out_dtype."""
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"CUTLASS GEMM: M, N, K must be positive, got M={m}, N={n}, K={k}")
    if max(m, n, k) >= 2**31:
        raise ValueError(f"CUTLASS GEMM: M, N, K must be < 2^31, got M={m}, N={n}, K={k}")
    if k % align_k:
        raise ValueError(
            f"CUTLASS GEMM: K={k} is not a multiple of {align_k} (16-byte rows for the tensor-memory copies); "
            "pad K or use the Triton / reference kernels"
        )
    a = output_alignment(out_dtype)
    if n % a:
        raise ValueError(
            f"CUTLASS GEMM: N={n} is not a multiple of {a} ({out_dtype} output rows are stored in 16-byte units); "
            "pad N or use the Triton / reference kernels"
        )
