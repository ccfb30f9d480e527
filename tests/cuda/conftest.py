"""Fixtures shared by the CUDA build tests: the nvcc toolchain and cuobjdump, or a skip saying what is missing."""

from __future__ import annotations

import pytest

from wush_compile.cuda import builder


@pytest.fixture(scope="module")
def toolchain():
    try:
        return builder.find_toolchain()
    except builder.BuildError as exc:
        pytest.skip(f"cannot build CUDA kernels here: {exc}")


@pytest.fixture(scope="module")
def cuobjdump():
    path = builder.find_cuobjdump()
    if path is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or triton's bundled copy)")
    return path
