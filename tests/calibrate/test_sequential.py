"""``WushConfig.sequential``: block i calibrated on the quantized or on the full-precision blocks' outputs."""

from __future__ import annotations

import torch

import calibrate
from wush_compile.config import WushConfig

from .conftest import tiny_batches, tiny_model


def _codes(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_codes")}


def test_non_sequential_changes_only_the_later_blocks_and_is_deterministic():
    batches = tiny_batches()
    runs = {}
    for seq in (True, False, False):
        m = tiny_model()
        calibrate.calibrate(m, batches, WushConfig(sequential=seq))
        runs.setdefault(seq, []).append(_codes(m))
    seq_codes, nonseq_codes = runs[True][0], runs[False][0]
    assert all(torch.equal(nonseq_codes[n], runs[False][1][n]) for n in nonseq_codes)  # bit-identical re-run
    first = [n for n in seq_codes if ".layers.0." in n]
    later = [n for n in seq_codes if ".layers.0." not in n]
    assert first and later
    # Block 0 sees the same (embedding) inputs either way; later blocks see different inputs.
    assert all(torch.equal(seq_codes[n], nonseq_codes[n]) for n in first)
    assert any(not torch.equal(seq_codes[n], nonseq_codes[n]) for n in later)
