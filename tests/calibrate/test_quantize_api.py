"""wush_compile.quantize: texts, files, datasets, token ids with masks; block-by-block onload."""

import pytest
import torch

import calibrate
import wush_compile
from calibrate import pipeline
from calibrate.samples import build_batches, pad_samples
from wush_compile import WushConfig, WushLinear

from .conftest import VOCAB, tiny_model

CFG = WushConfig(format="mxfp4", method="rtn", transform="wush", nsamples=4, seqlen=24)


class ByteTokenizer:
    """Bytes as token ids (mod the tiny vocabulary); a chat template that tags each message."""

    pad_token_id = 0
    chat_template = "tagged"

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        class Out:
            input_ids = torch.tensor([[b % VOCAB for b in text.encode()]], dtype=torch.long)

        return Out()

    def apply_chat_template(self, messages, tokenize=False):
        assert tokenize is False
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


class FakeDataset:
    """The part of datasets.Dataset the builder uses: column_names, len, row access."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "short one",
    "Lists, tuples and dicts are the containers of Python.",
]


def _codes(model):
    return {n: m.weight_codes.clone() for n, m in model.named_modules() if isinstance(m, WushLinear)}


def test_quantize_texts_returns_model_and_report():
    model = tiny_model()
    out, report = wush_compile.quantize(model, CFG, dataset=TEXTS, tokenizer=ByteTokenizer(), batch_size=2)
    assert out is model and report is calibrate.get_report(model)
    assert len(report.layers) == 14 and all(0 < r.rel_err < 0.5 for r in report.layers)
    # every text is one sample truncated to seqlen; padded tokens are not counted
    assert report.tokens == sum(min(len(t.encode()), CFG.seqlen) for t in TEXTS)
    assert report.seconds > 0


def test_padding_does_not_change_the_result():
    """Ragged samples padded into one batch give the same layers as each sample in its own unpadded batch."""
    tok = ByteTokenizer()
    samples = [torch.tensor([b % VOCAB for b in t.encode()][: CFG.seqlen]) for t in TEXTS]
    padded = pad_samples(samples, batch_size=4, pad_id=7)
    assert isinstance(padded[0], dict) and int(padded[0]["attention_mask"].sum()) == sum(s.numel() for s in samples)
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    _, ra = wush_compile.quantize(a, CFG, dataset=padded, tokenizer=tok)
    _, rb = wush_compile.quantize(b, CFG, dataset=[s.unsqueeze(0) for s in samples], tokenizer=tok)
    assert ra.tokens == rb.tokens
    # the same batch with the mask dropped: the padding enters the Hessians and the layers change
    _, rc = wush_compile.quantize(c, CFG, dataset=[padded[0]["input_ids"]], tokenizer=tok)
    ca, cb, cc = _codes(a), _codes(b), _codes(c)
    same = sum(int((ca[n] == cb[n]).sum()) for n in ca) / sum(ca[n].numel() for n in ca)
    with_pad = sum(int((ca[n] == cc[n]).sum()) for n in ca) / sum(ca[n].numel() for n in ca)
    assert same > 0.999, same
    assert with_pad < same - 0.01, (with_pad, same)
    for x, y in zip(ra.layers, rb.layers):
        assert x.name == y.name


def test_quantize_text_file_windows(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(TEXTS) * 8, encoding="utf-8")
    model = tiny_model()
    _, report = wush_compile.quantize(model, CFG, dataset=str(path), tokenizer=ByteTokenizer())
    assert report.tokens == CFG.nsamples * CFG.seqlen


def test_quantize_dataset_text_column_and_chat_messages():
    tok = ByteTokenizer()
    batches = build_batches(FakeDataset([{"text": t} for t in TEXTS]), tok, nsamples=2, seqlen=16)
    assert sum(int(b.numel()) if torch.is_tensor(b) else int(b["attention_mask"].sum()) for b in batches) == 32
    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]} for t in TEXTS]
    chat = build_batches(FakeDataset(rows), tok, nsamples=4, seqlen=64)
    want = [tok.apply_chat_template(r["messages"])[:64] for r in rows]
    got = chat[0]["input_ids"] if isinstance(chat[0], dict) else chat[0]
    assert got[0, : len(want[0])].tolist() == [b % VOCAB for b in want[0].encode()]
    model = tiny_model()
    _, report = wush_compile.quantize(model, CFG, dataset=FakeDataset(rows), tokenizer=tok)
    assert report.tokens == sum(min(len(w.encode()), CFG.seqlen) for w in want)


def test_quantize_token_ids_with_mask_mapping():
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    model = tiny_model()
    _, report = wush_compile.quantize(model, CFG, dataset={"input_ids": ids, "attention_mask": mask}, batch_size=2)
    assert report.tokens == 60 - 8


@pytest.mark.parametrize(
    "dataset, tokenizer, message",
    [
        (["a text"], None, "tokenizer=..."),
        ([], None, "empty"),
        (FakeDataset([{"body": "x"}]), ByteTokenizer(), "text_column='NAME'"),
        (3.5, None, "list of texts"),
        ([torch.zeros(3), "text"], None, "only strings"),
    ],
)
def test_quantize_bad_datasets_name_the_fix(dataset, tokenizer, message):
    with pytest.raises((TypeError, ValueError), match=message):
        wush_compile.quantize(tiny_model(), CFG, dataset=dataset, tokenizer=tokenizer)


def test_mask_shape_mismatch_error():
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask of shape"):
        calibrate.calibrate(tiny_model(), [{"input_ids": ids, "attention_mask": torch.ones(2, 7)}], CFG)


def test_block_by_block_onload(monkeypatch):
    """With device= other than the model's, each block is moved to it before it runs and back after, one at a
    time; the result equals calibrating in place. ("cpu:0" is a device other than the model's "cpu".)"""
    events = []
    loaded = set()
    orig_on, orig_off = pipeline._onload, pipeline._offload

    def on(block, device):
        loaded.add(id(block))
        events.append(("on", id(block), str(device)))
        orig_on(block, device)

    def off(block, home):
        loaded.discard(id(block))
        events.append(("off", id(block), str(home)))
        orig_off(block, home)

    monkeypatch.setattr(pipeline, "_onload", on)
    monkeypatch.setattr(pipeline, "_offload", off)
    model, ref = tiny_model(), tiny_model()
    blocks = list(model.model.layers)
    ran = []
    for blk in blocks:
        blk.register_forward_pre_hook(lambda m, a: ran.append((id(m), set(loaded))))
    samples = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))]
    wush_compile.quantize(model, CFG, dataset=samples, device="cpu:0")
    wush_compile.quantize(ref, CFG, dataset=samples)
    assert events == [(k, id(b), d) for b in blocks for k, d in (("on", "cpu:0"), ("off", "cpu"))]
    calib_runs = [(blk, now) for blk, now in ran if now]  # the capture pass runs no block (catchers)
    assert calib_runs and all(now == {blk} for blk, now in calib_runs)
    ca, cr = _codes(model), _codes(ref)
    assert ca.keys() == cr.keys() and all(torch.equal(ca[n], cr[n]) for n in ca)
    assert all(p.device.type == "cpu" for p in model.buffers())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_block_by_block_on_cuda_keeps_model_on_cpu():
    model = tiny_model(layers=4)
    samples = [torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))]
    torch.cuda.reset_peak_memory_stats()
    wush_compile.quantize(model, WushConfig(method="gptq", nsamples=2, seqlen=32), dataset=samples, device="cuda")
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    assert sum(isinstance(m, WushLinear) for m in model.modules()) == 28


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, dict):
            assert isinstance(y, dict) and set(x) == set(y)
            assert all(torch.equal(x[k], y[k]) for k in x)
        else:
            assert torch.equal(x, y)


def test_real_datasets_dataset_text_column_and_chat_messages():
    """A datasets.Dataset built in memory (no download): the same samples as the plain rows, and the same layers."""
    datasets = pytest.importorskip("datasets")
    tok = ByteTokenizer()
    ds = datasets.Dataset.from_dict({"body": TEXTS, "id": list(range(len(TEXTS)))})
    got = build_batches(ds, tok, nsamples=4, seqlen=16, text_column="body")
    _same_batches(got, build_batches(FakeDataset([{"body": t} for t in TEXTS]), tok, nsamples=4, seqlen=16,
                                     text_column="body"))
    _same_batches(got, build_batches(TEXTS, tok, nsamples=4, seqlen=16))
    rows = [[{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}] for t in TEXTS]
    chat_ds = datasets.Dataset.from_dict({"messages": rows})
    _same_batches(build_batches(chat_ds, tok, nsamples=4, seqlen=64),
                  build_batches(FakeDataset([{"messages": r} for r in rows]), tok, nsamples=4, seqlen=64))
    a, b = tiny_model(), tiny_model()
    _, ra = wush_compile.quantize(a, CFG, dataset=chat_ds, tokenizer=tok)
    _, rb = wush_compile.quantize(b, CFG, dataset=[tok.apply_chat_template(r) for r in rows], tokenizer=tok)
    assert ra.tokens == rb.tokens > 0
    ca, cb = _codes(a), _codes(b)
    assert all(torch.equal(ca[n], cb[n]) for n in ca)
    with pytest.raises(ValueError, match="text_column"):
        build_batches(ds, tok, nsamples=2, seqlen=16)  # no "text" column: the error names the option
