"""WushLinear: dtype conversions keep the fp32 global scales exactly."""

import torch

from wush_compile import WushLinear


def test_dtype_conversion_keeps_fp32_global_scales_exact():
    m = WushLinear(64, 32, fmt="nvfp4")
    m.weight_global_scale.fill_(0.000123456789)
    m.act_global_scale.fill_(1.0 / 3.0)
    before = (m.weight_global_scale.clone(), m.act_global_scale.clone())
    for convert in (lambda mod: mod.to(torch.bfloat16), lambda mod: mod.half(), lambda mod: mod.float()):
        convert(m)
        assert m.weight_global_scale.dtype == torch.float32 and m.act_global_scale.dtype == torch.float32
        assert torch.equal(m.weight_global_scale, before[0]) and torch.equal(m.act_global_scale, before[1])
        assert m.weight_codes.dtype == torch.uint8 and m.weight_scales.dtype == torch.uint8
    m.to(torch.bfloat16)
    assert m.transform.dtype == torch.bfloat16
