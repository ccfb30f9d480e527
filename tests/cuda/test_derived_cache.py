"""The per-layer derived-operand cache of the CUDA paths (fp32 transforms, fp32 biases, swizzled scales): keyed by
storage, shape, strides and version, so a fresh view of the same buffer hits and an in-place update misses."""

from __future__ import annotations

import torch

from wush_compile.cuda import ops as cuda_ops


def _counting_cache():
    calls = []

    def fn(t):
        calls.append(1)
        return t.to(torch.float32)

    return cuda_ops._DerivedCache(fn), calls


def test_view_of_same_buffer_hits():
    cache, calls = _counting_cache()
    t = torch.randn(4, 32, 32, dtype=torch.bfloat16)
    a = cache(t)
    b = cache(t.view(4, 32, 32))  # another Python object, same storage / shape / strides
    assert a is b and len(calls) == 1


def test_in_place_update_and_other_shapes_miss():
    cache, calls = _counting_cache()
    t = torch.randn(4, 32, 32, dtype=torch.bfloat16)
    cache(t)
    t.mul_(2)
    assert torch.equal(cache(t), t.float()) and len(calls) == 2
    cache(t.view(2, 64, 32))
    assert len(calls) == 3


def test_entry_keeps_source_alive_and_clear_drops_it():
    cache, _ = _counting_cache()
    t = torch.randn(8, dtype=torch.bfloat16)
    ptr = t.data_ptr()
    cache(t)
    del t
    # the source is held by the entry, so its address cannot be handed to another tensor while cached
    assert any(k[0] == ptr for k in cache._entries)
    cache.clear()
    assert not cache._entries


def test_clear_caches_empties_every_cache():
    cuda_ops.fp32_transform(torch.randn(2, 16, 16, dtype=torch.bfloat16))
    cuda_ops.fp32_bias(torch.randn(16, dtype=torch.bfloat16))
    cuda_ops.clear_caches()
    assert not cuda_ops.fp32_transform._entries and not cuda_ops.fp32_bias._entries
