"""Golden tests (expecttest): the rewritten FX graph and the explain table of a tiny model.

Regenerate after an intended change with ``EXPECTTEST_ACCEPT=1 pytest tests/passes/test_golden.py``.
"""

from __future__ import annotations

import re

import pytest
import torch

expecttest = pytest.importorskip("expecttest", reason="golden tests need expecttest (pip install expecttest)")

import wush_compile  # noqa: E402
from wush_compile import backend as wb  # noqa: E402

from ..runtime._models import TinyAttention  # noqa: E402

_PLACEHOLDER = re.compile(r"\bl_self_((?:modules_[A-Za-z0-9]+_)+)(?:buffers|parameters)_([A-Za-z_]+?)_\b")


def _short(match: re.Match) -> str:
    mods = [m for m in match.group(1).split("modules_") if m]
    return ".".join(m.rstrip("_") for m in mods) + "." + match.group(2)


def compact(code: str) -> str:
    """The graph's Python code without placeholder copies and deletions, with short buffer names."""
    out = []
    for line in code.strip().splitlines()[1:]:
        line = line.strip().split(";")[0]
        if re.fullmatch(r"l_\w+ = L_\w+", line):
            continue
        line = _PLACEHOLDER.sub(_short, line).replace("l_x_", "x")
        out.append(line)
    return "\n".join(out)


def _compile(model, x, **options):
    torch._dynamo.reset()
    with wb.collect_results() as results, torch.no_grad():
        torch.compile(model, backend="wush", fullgraph=True, options={"inductor": False, **options})(x)
    (res,) = results
    return res


class TestGolden(expecttest.TestCase):
    def test_rewritten_graph_grouped(self):
        res = _compile(TinyAttention().eval(), torch.randn(2, 5, 64))
        self.assertExpectedInline(compact(res.code), """\
fused_linear_group_default = torch.ops.wush.fused_linear_group.default(x, [q.weight_codes, k.weight_codes, v.weight_codes], [q.weight_scales, k.weight_scales, v.weight_scales], q.transform, [q.weight_global_scale, k.weight_global_scale, v.weight_global_scale], q.act_global_scale, [q.bias, None, None], 'mxfp4', 'reference')
getitem = fused_linear_group_default[0]
getitem_1 = fused_linear_group_default[1]
getitem_2 = fused_linear_group_default[2]
kv = torch.cat([getitem_1, getitem_2], dim = -1)
relu = torch.relu(getitem)
mul = relu * kv
fused_linear_default_3 = torch.ops.wush.fused_linear.default(mul, o.weight_codes, o.weight_scales, o.transform, o.weight_global_scale, o.act_global_scale, None, 'mxfp4', 'reference')
linear_4 = torch._C._nn.linear(fused_linear_default_3, head.weight, head.bias)
return (linear_4,)""")

    def test_rewritten_graph_ungrouped_nvfp4(self):
        res = _compile(TinyAttention("nvfp4", kind="wush").eval(), torch.randn(3, 64))
        self.assertExpectedInline(compact(res.code), """\
fused_linear_default = torch.ops.wush.fused_linear.default(x, q.weight_codes, q.weight_scales, q.transform, q.weight_global_scale, q.act_global_scale, q.bias, 'nvfp4', 'reference')
fused_linear_default_1 = torch.ops.wush.fused_linear.default(x, k.weight_codes, k.weight_scales, k.transform, k.weight_global_scale, k.act_global_scale, None, 'nvfp4', 'reference')
fused_linear_default_2 = torch.ops.wush.fused_linear.default(x, v.weight_codes, v.weight_scales, v.transform, v.weight_global_scale, v.act_global_scale, None, 'nvfp4', 'reference')
kv = torch.cat([fused_linear_default_1, fused_linear_default_2], dim = -1)
relu = torch.relu(fused_linear_default)
mul = relu * kv
fused_linear_default_3 = torch.ops.wush.fused_linear.default(mul, o.weight_codes, o.weight_scales, o.transform, o.weight_global_scale, o.act_global_scale, None, 'nvfp4', 'reference')
linear_4 = torch._C._nn.linear(fused_linear_default_3, head.weight, head.bias)
return (linear_4,)""")

    def test_explain_table(self):
        report = wush_compile.explain(TinyAttention().eval(), torch.randn(2, 5, 64),
                                      compile_options={"inductor": False})
        self.assertExpectedInline(str(report), """\
wush explain: 4 of 4 calibrated Linears rewritten, 1 shared-input groups, 1 plain Linears left in high precision, 1 graph(s)
layer  N   K   fmt    transform  status      kernel     path       M   group  why
---------------------------------------------------------------------------------
q      64  64  mxfp4  hadamard   rewritten   reference  reference  10  g0     cpu tensors run the torch reference
k      32  64  mxfp4  hadamard   rewritten   reference  reference  10  g0     cpu tensors run the torch reference
v      32  64  mxfp4  hadamard   rewritten   reference  reference  10  g0     cpu tensors run the torch reference
o      64  64  mxfp4  hadamard   rewritten   reference  reference  10  -      cpu tensors run the torch reference
head   16  64  -      -          left alone  -          -          -   -      not calibrated: a plain torch Linear stays in high precision (Inductor compiles it)
groups (x transformed and quantized once):
  g0 = {q,k,v} (3 members)""")


@pytest.mark.parametrize(
    "path",
    [
        "L['self'].model.layers[0].mlp.up_proj",
        "L['args'][0].model.layers[0].mlp.up_proj",  # the module passed as an argument (explain, functions)
        "L['kwargs']['model'].model.layers[0].mlp.up_proj",
        "G['model'].model.layers[0].mlp.up_proj",
        "L['self']._modules['model']._modules['layers']._modules['0'].mlp.up_proj",
    ],
)
def test_module_path_is_the_modules_own_qualified_name(path):
    from wush_compile.passes._common import normalize_module_path

    assert normalize_module_path(path) == "model.layers.0.mlp.up_proj"
