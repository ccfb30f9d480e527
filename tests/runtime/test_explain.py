"""wush_compile.explain: report contents, module-name mapping, and the `wush explain DIR` command."""

from __future__ import annotations

import argparse

import pytest
import torch

import wush_compile
from wush_compile import explain_cli
from wush_compile.explain import NOT_TRACED

from ._models import TinyAttention, calibrate_llama, count_wush_linears, tiny_llama


def test_report_rows_and_graph():
    model = TinyAttention().eval()
    report = wush_compile.explain(model, torch.randn(2, 5, 64), compile_options={"inductor": False})
    assert report.rewritten == 4 and report.calibrated == 4
    assert [r.name for r in report.rows] == ["q", "k", "v", "o", "head"]
    q = report.row("q")
    assert (q.n, q.k, q.fmt, q.transform, q.status, q.kernel, q.m) == (64, 64, "mxfp4", "hadamard", "rewritten",
                                                                        "reference", 10)
    assert q.path == "reference (torch twin)" and q.reason == "cpu tensors run the torch reference"
    assert report.groups == {"{q,k,v}": ["q", "k", "v"]}
    head = report.row("head")
    assert head.status == "left alone" and not head.calibrated and head.reason.startswith("not calibrated")
    assert isinstance(report.graph, torch.fx.GraphModule)
    targets = [n.target for n in report.graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.wush.fused_linear_group.default in targets
    assert torch.ops.wush.fused_linear.default in targets
    assert not any(t in (torch.ops.wush.linear, torch.ops.wush.linear.default) for t in targets)
    text = str(report)
    assert "4 of 4 calibrated Linears rewritten" in text and "g0 = {q,k,v} (3 members)" in text
    with pytest.raises(KeyError, match=r"no Linear named 'nope'"):
        report.row("nope")


class _TwoPaths(torch.nn.Module):
    """One calibrated layer is never called: it must show up as not traced."""

    def __init__(self):
        super().__init__()
        base = TinyAttention()
        self.used, self.unused = base.q, base.o

    def forward(self, x):
        return self.used(x)


def test_unused_layer_and_dynamic_m_in_report():
    model = _TwoPaths().eval()
    x = torch.randn(3, 64)
    torch._dynamo.mark_dynamic(x, 0)
    report = wush_compile.explain(model, x, compile_options={"inductor": False})
    assert report.rewritten == 1 and report.calibrated == 2
    assert report.row("unused").status == "not traced" and report.row("unused").reason == NOT_TRACED
    used = report.row("used")
    assert used.m_dynamic and used.m == 3 and used.kernel == "reference"
    assert "1 calibrated Linear(s) not rewritten" in str(report) and "M* = dynamic M" in str(report)


def test_llama_module_names_map_back():
    model = calibrate_llama(tiny_llama(layers=1), "mxfp4", "wush")
    report = wush_compile.explain(model, torch.randint(0, 128, (1, 4)), compile_options={"inductor": False})
    names = {r.name for r in report.rows if r.status == "rewritten"}
    assert names == {f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj")}
    assert report.rewritten == count_wush_linears(model)


def test_explain_rejects_non_module():
    with pytest.raises(TypeError, match=r"explain expects an nn.Module, got function"):
        wush_compile.explain(lambda x: x, torch.randn(2))


def _cli(argv):
    parser = argparse.ArgumentParser(prog="wush")
    sub = parser.add_subparsers(dest="command", required=True)
    explain_cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_explain_smoke(tmp_path, capsys):
    """`wush explain DIR` on a saved (uncalibrated) Llama: plain Inductor, every Linear left alone."""
    model = tiny_llama(layers=1)
    model.save_pretrained(tmp_path / "ckpt")
    assert _cli(["explain", str(tmp_path / "ckpt"), "--tokens", "5", "--no-inductor", "--graph"]) == 0
    out = capsys.readouterr().out
    assert "0 of 0 calibrated Linears rewritten" in out
    assert "model.layers.0.self_attn.q_proj" in out and "not calibrated" in out
    assert "def forward" in out  # --graph


def test_cli_explain_calibrated_checkpoint(tmp_path, capsys):
    pytest.importorskip("wush_compile.hf", reason="saving calibrated checkpoints needs wush_compile.hf")
    model = calibrate_llama(tiny_llama(layers=1), "mxfp4", "wush")
    from wush_compile import hf

    hf.save_pretrained(model, tmp_path / "ckpt")  # assembled by hand: the explicit save path
    assert _cli(["explain", str(tmp_path / "ckpt"), "--tokens", "4", "--no-inductor"]) == 0
    out = capsys.readouterr().out
    assert "7 of 7 calibrated Linears rewritten" in out


def test_cli_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config.json; pass a model.save_pretrained\(\) directory"):
        _cli(["explain", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--tokens and --batch must be >= 1, got 0"):
        _cli(["explain", str(tmp_path), "--tokens", "0"])


def test_wush_command_has_explain():
    cli = pytest.importorskip("wush_compile.cli")
    try:
        parser = cli.build_parser()
    except ImportError as exc:  # another subcommand's module is not there yet
        pytest.skip(f"wush CLI incomplete: {exc}")
    args = parser.parse_args(["explain", "somewhere"])
    assert args.func is explain_cli.run
