"""The 128x4 swizzled scale layout and the launch parameters, on the CPU.

The reference layout below is written from the cuBLAS documentation ("1D Block Scaling Factors Layout"): the
scale matrix is padded to multiples of 128 rows and 4 columns and cut into 128x4 blocks stored one after
another, block columns fastest; a block is stored as 32 lines of 16 bytes, line i holding the 4 scales of rows
i, i + 32, i + 64 and i + 96 in that order. It is built by reshaping, independently of the arithmetic in
wush_compile.cuda.layout. tests/cuda/test_build.py also checks layout against CUTLASS's own layout function.
"""

import pytest
import torch

from wush_compile.config import Format
from wush_compile.cuda import layout

SHAPES = [(1, 1), (1, 4), (5, 3), (127, 4), (128, 4), (129, 5), (256, 8), (300, 11), (64, 128), (1000, 7)]


def doc_swizzle(scales: torch.Tensor) -> torch.Tensor:
    rows, cols = scales.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = torch.zeros(pr, pc, dtype=scales.dtype)
    padded[:rows, :cols] = scales
    blocks = padded.reshape(pr // 128, 128, pc // 4, 4).permute(0, 2, 1, 3)  # (row blocks, col blocks, 128, 4)
    lines = blocks.reshape(pr // 128, pc // 4, 4, 32, 4).permute(0, 1, 3, 2, 4)  # (rb, cb, line, quarter, col)
    return lines.reshape(-1)


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_to_swizzled_matches_the_documented_layout(rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    scales = torch.randint(1, 256, (rows, cols), dtype=torch.uint8, generator=g)
    out = layout.to_swizzled(scales)
    assert out.dtype == torch.uint8 and out.dim() == 1
    assert out.numel() == layout.swizzled_scale_numel(rows, cols)
    assert torch.equal(out, doc_swizzle(scales))


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_from_swizzled_inverts_and_padding_is_zero(rows, cols):
    scales = torch.randint(1, 256, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(cols))
    buf = layout.to_swizzled(scales)
    assert torch.equal(layout.from_swizzled(buf, rows, cols), scales)
    used = torch.zeros(buf.numel(), dtype=torch.bool)
    used[layout.swizzled_offsets(rows, cols).reshape(-1)] = True
    assert int(used.sum()) == rows * cols  # a bijection onto its image
    assert torch.all(buf[~used] == 0), "padding must hold a finite (zero) scale, never 0xFF (NaN)"


def test_offsets_by_hand():
    # rows=300 (3 row tiles), 11 groups (3 column tiles)
    off = layout.swizzled_offsets(300, 11)
    assert off[0, 0] == 0
    assert off[0, 1] == 1 and off[0, 3] == 3  # columns of one row are adjacent
    assert off[1, 0] == 16  # the next row is the next 16-byte line
    assert off[32, 0] == 4  # row 32 shares line 0, second quarter
    assert off[96, 3] == 15
    assert off[0, 4] == 512  # next column tile
    assert off[128, 0] == 3 * 512  # next row tile comes after all 3 column tiles
    assert off[299, 10] == (2 * 3 + 2) * 512 + (43 % 32) * 16 + (43 // 32) * 4 + 2


def test_shapes_and_errors():
    assert layout.swizzled_scale_shape(1, 1) == (128, 4)
    assert layout.swizzled_scale_shape(128, 4) == (128, 4)
    assert layout.swizzled_scale_shape(129, 5) == (256, 8)
    with pytest.raises(ValueError, match="2-D uint8"):
        layout.to_swizzled(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="512 uint8 bytes"):
        layout.from_swizzled(torch.zeros(100, dtype=torch.uint8), 3, 2)
    with pytest.raises(ValueError, match="non-negative"):
        layout.swizzled_scale_shape(-1, 3)


@pytest.mark.parametrize(
    "m,rows", [(1, 32), (16, 32), (33, 64), (64, 64), (65, 128), (128, 128), (129, 128), (10000, 128)]
)
def test_quantize_launch_rows_per_cta(m, rows):
    plan = layout.quantize_launch(m, 4096, "mxfp4", torch.bfloat16, True)
    assert plan.block == (rows, 1, 1)
    assert plan.grid == (4096 // 32, -(-m // rows), 1)
    assert plan.grid[1] * rows >= m > (plan.grid[1] - 1) * rows
    assert plan.smem_bytes == 32 * 32 * 4
    assert plan.kernel == "wush_tq_mxfp4_bf16"


def test_quantize_launch_nvfp4_and_identity():
    plan = layout.quantize_launch(5, 64, Format.NVFP4, torch.float32, False)
    assert plan.grid == (4, 1, 1) and plan.smem_bytes == 0 and plan.kernel == "wush_tq_nvfp4_fp32"
    assert layout.quantize_launch(5, 64, "nvfp4", torch.float16, True).smem_bytes == 16 * 16 * 4


def test_quantize_launch_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        layout.quantize_launch(4, 48, "mxfp4", torch.float32, True)
    with pytest.raises(ValueError, match="M >= 1"):
        layout.quantize_launch(0, 64, "mxfp4", torch.float32, True)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        layout.quantize_launch(4, 64, "mxfp4", torch.float64, True)
    with pytest.raises(ValueError, match="split the rows"):
        layout.quantize_launch(128 * 65536, 64, "nvfp4", torch.float32, True)


def test_gemm_shape_checks():
    layout.check_gemm_shape(1, 8, 32, torch.bfloat16)
    layout.check_gemm_shape(3, 4, 64, torch.float32)
    assert layout.output_alignment(torch.float16) == 8 and layout.output_alignment(torch.float32) == 4
    with pytest.raises(ValueError, match="K=48 is not a multiple of 32"):
        layout.check_gemm_shape(1, 8, 48, torch.bfloat16)
    with pytest.raises(ValueError, match="N=12 is not a multiple of 8"):
        layout.check_gemm_shape(1, 12, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="must be positive"):
        layout.check_gemm_shape(0, 8, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        layout.output_alignment(torch.float64)
    layout.check_gemm_shape(1, 8, 16, torch.bfloat16, align_k=16)
