"""Compiled generate(): static cache + backend="wush" through transformers' compile_config; the eager trap warns."""

import warnings

import pytest
import torch

import calibrate
import wush_compile
from wush_compile import WushConfig
from wush_compile.generation import EagerGenerateWarning, compile_config, generate

from .calibrate.conftest import tiny_batches, tiny_model


@pytest.fixture(scope="module")
def qmodel():
    model = tiny_model()
    calibrate.calibrate(model, tiny_batches(1), WushConfig(method="rtn", transform="hadamard"))
    model.generation_config.pad_token_id = 0
    return model


def test_compiled_generate_runs_the_wush_backend_and_matches_eager(qmodel, monkeypatch):
    import wush_compile.backend as backend

    calls = []
    orig = backend.wush_backend
    monkeypatch.setitem(torch._dynamo.backends.registry._COMPILER_FNS, "wush",
                        lambda gm, inputs, **kw: calls.append(gm) or orig(gm, inputs, **kw))
    torch._dynamo.reset()
    ids = tiny_batches(1, 1, 8, seed=2)[0]
    eager = qmodel.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                            disable_compile=True)
    # rewrite only (no Inductor): the compiled graph runs the same ops as eager, so the tokens are identical
    out = generate(qmodel, ids, max_new_tokens=6, options={"inductor": False})
    assert calls, "the forward was not compiled with backend='wush'"
    assert torch.equal(out, eager)


def test_compile_config_cuda_uses_cuda_graphs():
    assert compile_config("cuda").mode == "reduce-overhead" and compile_config("cuda").backend == "wush"
    assert compile_config("cpu")._compile_all_devices is True


def test_torch_compile_wrapper_generate_warns_once(qmodel):
    compiled = torch.compile(qmodel, backend="wush")
    ids = tiny_batches(1, 1, 4, seed=3)[0]
    qmodel._wush_eager_warned = False
    with pytest.warns(EagerGenerateWarning, match="runs the model eagerly"):
        compiled.generate(ids, max_new_tokens=2, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EagerGenerateWarning)
        compiled.generate(ids, max_new_tokens=2, do_sample=False)  # once per model
    del compiled


def test_plain_eager_generate_does_not_warn():
    model = tiny_model(seed=4)
    calibrate.calibrate(model, tiny_batches(1), WushConfig(method="rtn", transform="identity"))
    model.generation_config.pad_token_id = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", EagerGenerateWarning)
        model.generate(tiny_batches(1, 1, 4)[0], max_new_tokens=2, do_sample=False)
