"""Checkpoints: save_pretrained / from_pretrained of WushLinear models through quant_method "wush".

Tiny random Llama models are built here (no downloads); the slow test round-trips the real demo model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

import calibrate
import wush_compile  # noqa: F401  (registers quant_method "wush")
from wush_compile import WushConfig, WushLinear, hf
from wush_compile.hf import CheckpointError

from ._demo import demo_gguf_or_skip

VOCAB = 112


def tiny_llama(*, tie=True, bias=False, intermediate=96, dtype=torch.float32, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    # built in ``dtype`` the way from_pretrained builds it (non-persistent rotary buffers stay fp32)
    model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    if bias:  # random biases (the default init zeroes them, which would not test anything)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, nn.Linear) and mod.bias is not None:
                    mod.bias.normal_()
    return model


def quantize_model(model: nn.Module, config: WushConfig, *, include_lm_head: bool = False) -> list[str]:
    """Replace every eligible Linear of the decoder layers (and optionally lm_head) by a WushLinear."""
    done = []
    for name, mod in list(model.named_modules()):
        wanted = name.startswith("model.layers") or (include_lm_head and name == "lm_head")
        if not isinstance(mod, nn.Linear) or not wanted:
            continue
        if mod.in_features % config.group_size:
            continue  # stays in high precision
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, calibrate.quantize_linear(mod, None, config, name=name))
        done.append(name)
    hf.attach(model)  # what calibrate() does: marks the model so save_pretrained writes a wush checkpoint
    return done


def ids(seed=1):
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), set(sa) ^ set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, (k, sa[k].dtype, sb[k].dtype)
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An MXFP4 RTN model (fp32, tied embeddings) saved once; (model, directory)."""
    model = tiny_llama()
    cfg = WushConfig(format="mxfp4", method="rtn", transform="wush")
    quantize_model(model, cfg)
    d = tmp_path_factory.mktemp("wush_ckpt")
    model.save_pretrained(d)
    return model, d


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------------------------------------------------------------------
# What is written
# --------------------------------------------------------------------------------------------------------------


def test_config_json_carries_everything_needed(saved):
    model, d = saved
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "wush"
    assert qc["format_version"] == hf.FORMAT_VERSION
    assert qc["format"] == "mxfp4" and qc["transform"] == "wush"
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, WushLinear)}
    assert set(qc["modules"]) == set(quantized) and len(quantized) == 14
    tensors = load_file(d / "model.safetensors")
    record = json.loads(bytes(tensors.pop(hf.INTEGRITY_TENSOR).numpy()).decode())
    crc = record["tensors"]  # format 2: checksums of EVERY tensor live with the weights
    assert set(crc) == set(tensors) and "model.norm.weight" in crc and "model.embed_tokens.weight" in crc
    for name, mod in quantized.items():
        assert {f"{name}.{b}" for b, _ in mod.named_buffers()} | {f"{name}.weight"} <= set(crc)
        assert "crc32" not in qc["modules"][name]
        assert qc["modules"][name] == {}  # format 3: only what differs from the defaults (nothing here)
    assert qc["dtype"] == "float32"
    loaded_qc = AutoModelForCausalLM.from_pretrained(d).config.quantization_config
    for name, mod in quantized.items():  # the defaults and the model's Linear fill in the full entry at load
        assert loaded_qc.modules[name] == {
            "fmt": "mxfp4",
            "transform_kind": "wush",
            "share_group": None,
            "bias": False,
            "in_features": mod.in_features,
            "out_features": mod.out_features,
            "dtype": "float32",
        }
    assert qc["modules_to_not_convert"] == ["lm_head"]
    files = sorted(os.listdir(d))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    tensors = load_file(d / "model.safetensors")
    for name in quantized:
        # no full-precision weight of a quantized layer is written: only the zero-size guard under its name
        assert tensors[f"{name}.weight"].shape == (0,) and tensors[f"{name}.weight"].dtype == torch.uint8
        assert tensors[f"{name}.weight_codes"].dtype == torch.uint8
    assert "lm_head.weight" not in tensors  # tied to the embedding


def test_calibration_settings_recorded(tmp_path):
    model = tiny_llama()
    cfg = WushConfig(format="nvfp4", method="gptq", transform="hadamard", nsamples=3, seqlen=8, seed=5)
    quantize_model(model, cfg)
    hf.attach(model, cfg)
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "gptq" and qc["format"] == "nvfp4" and qc["transform"] == "hadamard"
    assert qc["calibration"] == cfg.to_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.wush_config(loaded) == cfg
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))


def test_model_without_wush_layers_is_saved_as_usual(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, WushLinear) for m in loaded.modules())


# --------------------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_identical(tmp_path, fmt, dtype):
    model = tiny_llama(dtype=dtype, seed=3)
    cfg = WushConfig(format=fmt, method="rtn", transform="wush")
    names = quantize_model(model, cfg)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name in names:
        mod = loaded.get_submodule(name)
        assert isinstance(mod, WushLinear) and mod.fmt.value == fmt
        assert mod.transform.dtype == dtype and mod.weight_global_scale.dtype == torch.float32
        assert not hasattr(mod, "weight")
    assert loaded.model.embed_tokens.weight.dtype == dtype
    assert_same_state(model, loaded)
    x = ids()
    assert torch.equal(logits(model, x), logits(loaded, x))


def test_round_trip_with_bias_and_high_precision_linears(tmp_path):
    model = tiny_llama(bias=True, intermediate=80, tie=False)  # down_proj: K=80 is not a multiple of 32
    cfg = WushConfig(format="mxfp4", method="gptq", transform="wus")
    names = quantize_model(model, cfg)
    assert not any("down_proj" in n for n in names)
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    high = ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert sorted(qc["modules_to_not_convert"]) == high
    assert qc["modules"]["model.layers.0.self_attn.q_proj"]["bias"] is True
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    assert_same_state(model, loaded)
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))


def test_tied_embeddings_stay_tied(saved):
    model, d = saved
    loaded = AutoModelForCausalLM.from_pretrained(d)
    assert type(loaded.lm_head) is nn.Linear
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))


def test_quantized_lm_head_of_a_tied_model(tmp_path):
    model = tiny_llama(tie=True)
    cfg = WushConfig(format="nvfp4", method="rtn", transform="wush")
    names = quantize_model(model, cfg, include_lm_head=True)
    assert "lm_head" in names
    model.save_pretrained(tmp_path)
    saved_cfg = json.loads((tmp_path / "config.json").read_text())
    assert saved_cfg["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.lm_head, WushLinear)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))


def test_shared_transform_buffers_are_all_saved(tmp_path):
    """Layers whose buffers share storage (a transform shared by q/k/v) keep every tensor name in the file."""
    model = tiny_llama()
    quantize_model(model, WushConfig(format="mxfp4", method="rtn", transform="hadamard"))
    attn = model.model.layers[0].self_attn
    attn.k_proj.transform = attn.q_proj.transform  # one tensor, three names
    attn.v_proj.transform = attn.q_proj.transform
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for p in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{p}.transform" in tensors
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_state(model, loaded)


def test_save_load_save_gives_identical_files(saved, tmp_path):
    _, d = saved
    loaded = AutoModelForCausalLM.from_pretrained(d)
    loaded.save_pretrained(tmp_path)
    first = sorted(os.listdir(d))
    assert sorted(os.listdir(tmp_path)) == first
    for f in first:
        assert (d / f).read_bytes() == (tmp_path / f).read_bytes(), f


class _FloatAllocations(TorchDispatchMode):
    """Records the shapes of every floating-point tensor produced off the meta device."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                self.shapes.append(tuple(t.shape))
        return out


def test_no_full_precision_weight_is_materialized(saved, tmp_path, monkeypatch):
    model, d = saved
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # dispatch modes are per thread: load on this one
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, WushLinear)}
    weight_shapes.discard((VOCAB, 64))
    built_on = []
    real_init = WushLinear.__init__

    def spy(self, *args, **kwargs):
        built_on.append(kwargs.get("device"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(WushLinear, "__init__", spy)
    with _FloatAllocations() as rec:
        loaded = AutoModelForCausalLM.from_pretrained(d)
    assert built_on and all(str(dev) == "meta" for dev in built_on), built_on
    assert rec.shapes, "the recorder saw no allocation at all; it would not catch one either"
    assert (VOCAB, 64) in rec.shapes  # the embedding, loaded in full precision, is seen
    bad = [s for s in rec.shapes if s in weight_shapes]
    assert not bad, f"full-precision weights of quantized layers were allocated: {bad}"
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))
    # control: the same recorder does see those shapes when a full-precision model is loaded
    plain = tiny_llama()
    plain.save_pretrained(tmp_path)
    with _FloatAllocations() as rec2:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert weight_shapes <= set(rec2.shapes)


# --------------------------------------------------------------------------------------------------------------
# Errors that name the file and the tensor
# --------------------------------------------------------------------------------------------------------------


def _edit_tensors(d: Path, fn) -> Path:
    path = d / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def _edit_config(d: Path, fn) -> None:
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg, indent=2))


Q = "model.layers.0.self_attn.q_proj"


def test_corrupt_file_names_the_file(saved, tmp_path):
    d = copy_ckpt(saved[1], tmp_path / "garbage")
    path = d / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(64))
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    assert str(path) in str(err.value), str(err.value)

    d2 = copy_ckpt(saved[1], tmp_path / "truncated")
    path2 = d2 / "model.safetensors"
    data = path2.read_bytes()
    path2.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d2)
    assert str(path2) in str(err.value) and "corrupt or incomplete" in str(err.value), str(err.value)


def _tensor_byte_range(path: Path, tensor: str) -> tuple[int, int]:
    """Absolute [start, end) of a tensor's data in a safetensors file (8-byte header size, JSON header, data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    return 8 + n + start, 8 + n + end


@pytest.mark.parametrize("tensor", [f"{Q}.weight_codes", f"{Q}.weight_scales", f"{Q}.transform"])
def test_corrupt_tensor_data_names_the_tensor(saved, tmp_path, tensor):
    """A flipped bit inside a tensor (header intact) is caught by the CRC-32 that config.json records."""
    d = copy_ckpt(saved[1], tmp_path)
    path = d / "model.safetensors"
    start, end = _tensor_byte_range(path, tensor)
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    msg = str(err.value)
    assert str(path) in msg and f"'{tensor}'" in msg and "CRC-32" in msg, msg


def test_format_2_checkpoint_without_integrity_tensor_is_refused(saved, tmp_path):
    d = copy_ckpt(saved[1], tmp_path)
    path = _edit_tensors(d, lambda t: t.pop(hf.INTEGRITY_TENSOR))
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    assert str(path) in str(err.value) and f"'{hf.INTEGRITY_TENSOR}' is missing" in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "tensor", [f"{Q}.weight_scales", f"{Q}.transform", f"{Q}.act_global_scale", "model.norm.weight"]
)
def test_missing_tensor(saved, tmp_path, tensor):
    d = copy_ckpt(saved[1], tmp_path)
    path = _edit_tensors(d, lambda t: t.pop(tensor))
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    msg = str(err.value)
    assert str(path) in msg and f"'{tensor}'" in msg and "missing" in msg, msg


@pytest.mark.parametrize(
    "tensor,new,needle",
    [
        (f"{Q}.weight_scales", lambda t: t[:, :1].contiguous(), "shape"),
        (f"{Q}.weight_codes", lambda t: t[:-1].contiguous(), "shape"),
        (f"{Q}.transform", lambda t: t.reshape(1, 2, 32, 32).contiguous(), "shape"),
        (f"{Q}.weight_codes", lambda t: t.to(torch.int16), "dtype"),
        (f"{Q}.transform", lambda t: t.to(torch.float16), "dtype"),
        (f"{Q}.weight_global_scale", lambda t: t.to(torch.bfloat16), "dtype"),
    ],
)
def test_wrong_shape_or_dtype(saved, tmp_path, tensor, new, needle):
    d = copy_ckpt(saved[1], tmp_path)

    def edit(t):
        t[tensor] = new(t[tensor])

    path = _edit_tensors(d, edit)
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    msg = str(err.value)
    assert str(path) in msg and f"'{tensor}'" in msg and needle in msg, msg


def test_config_format_does_not_match_tensors(saved, tmp_path):
    """config says nvfp4 (G=16) but the scales are MXFP4's (G=32)."""
    d = copy_ckpt(saved[1], tmp_path)

    def edit(cfg):
        qc = cfg["quantization_config"]
        qc["format"] = "nvfp4"
        for entry in qc["modules"].values():
            entry["fmt"] = "nvfp4"

    _edit_config(d, edit)
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    msg = str(err.value)
    assert str(d / "model.safetensors") in msg and "weight_scales" in msg and "G=16" in msg, msg


def test_config_lists_a_layer_stored_in_full_precision(saved, tmp_path):
    d = copy_ckpt(saved[1], tmp_path)
    model = saved[0]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    entry = dict(qc["modules"][Q], in_features=64, out_features=VOCAB)
    _edit_config(d, lambda cfg: cfg["quantization_config"]["modules"].__setitem__("lm_head", entry))
    plain = tiny_llama(tie=False)  # a checkpoint that holds lm_head.weight
    plain.lm_head.weight.data.copy_(model.model.embed_tokens.weight)
    _edit_tensors(d, lambda t: t.__setitem__("lm_head.weight", plain.lm_head.weight.detach().clone()))
    _edit_config(d, lambda cfg: cfg.__setitem__("tie_word_embeddings", False))
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' is a full-precision weight"):
        AutoModelForCausalLM.from_pretrained(d)


def test_config_lists_a_module_the_model_lacks(saved, tmp_path):
    d = copy_ckpt(saved[1], tmp_path)
    _edit_config(
        d,
        lambda cfg: cfg["quantization_config"]["modules"].__setitem__(
            "model.layers.7.mlp.up_proj", cfg["quantization_config"]["modules"][Q]
        ),
    )
    with pytest.raises(CheckpointError, match=r"model.layers.7.mlp.up_proj.*no such module"):
        AutoModelForCausalLM.from_pretrained(d)


def test_config_module_shape_disagrees_with_model(saved, tmp_path):
    d = copy_ckpt(saved[1], tmp_path)
    _edit_config(d, lambda cfg: cfg["quantization_config"]["modules"][Q].__setitem__("out_features", 32))
    with pytest.raises(CheckpointError, match=rf"{Q}.*out_features=32.*64 -> 64"):
        AutoModelForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("version", [4, 0, "1", None])
def test_unknown_format_version(saved, tmp_path, version):
    d = copy_ckpt(saved[1], tmp_path)
    _edit_config(d, lambda cfg: cfg["quantization_config"].__setitem__("format_version", version))
    with pytest.raises(CheckpointError, match=rf"config.json.*format_version {version!r} is not supported"):
        AutoModelForCausalLM.from_pretrained(d)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda qc: qc.__setitem__("group_size", 8), "unknown keys"),
        (lambda qc: qc["modules"][Q].__setitem__("fmt", "int4"), "int4"),
        (lambda qc: (qc.pop("dtype"), qc["modules"][Q].pop("dtype", None)), "missing keys"),
        (lambda qc: qc["modules"][Q].__setitem__("dtype", "float64"), "float64"),
        (lambda qc: qc["modules"][Q].__setitem__("in_features", 40), "in_features=40"),
        (lambda qc: qc.__setitem__("calibration", {"format": "fp8"}), "fp8"),
        (lambda qc: qc["modules"][Q].__setitem__("crc32", [1, 2]), "crc32"),
    ],
)
def test_bad_quantization_config(saved, tmp_path, edit, needle):
    d = copy_ckpt(saved[1], tmp_path)
    _edit_config(d, lambda cfg: edit(cfg["quantization_config"]))
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    assert needle in str(err.value) and "config.json" in str(err.value), str(err.value)


def test_config_loads_with_autoconfig(saved):
    cfg = AutoConfig.from_pretrained(saved[1])
    qc = hf.WushQuantizationConfig.from_dict(cfg.quantization_config)
    assert len(qc.modules) == 14
    assert json.loads(qc.to_json_string()) == cfg.quantization_config


# --------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------


def test_registration_is_idempotent():
    from transformers.quantizers import auto

    hf.register()
    hf.register()
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["wush"] is hf.WushQuantizationConfig
    assert auto.AUTO_QUANTIZER_MAPPING["wush"] is hf.WushHfQuantizer
    assert not hasattr(PreTrainedModel.save_pretrained, "__wush_original__")  # save_pretrained is not patched


def test_import_twice_and_reload_in_a_fresh_process():
    code = (
        "import importlib, wush_compile, wush_compile.hf as h\n"
        "import wush_compile\n"
        "importlib.reload(h); importlib.reload(h)\n"
        "from transformers.quantizers import auto\n"
        "from transformers import PreTrainedModel\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['wush'] is h.WushHfQuantizer\n"
        "assert not hasattr(PreTrainedModel.save_pretrained, '__wush_original__')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_from_pretrained_refuses_on_the_fly_quantization(tmp_path):
    """The default (GPTQ + WUSH) needs calibration data: quantizing on load fails, naming wush_compile.quantize
    (the data-free configurations quantize on load: tests/calibrate/test_onload.py)."""
    plain = tiny_llama()
    plain.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"needs calibration data.*wush_compile\.quantize"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=hf.WushQuantizationConfig())


# --------------------------------------------------------------------------------------------------------------
# The demo model (GGUF-loaded, so it starts with transformers' GGUF quantizer attached)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_model_round_trip(tmp_path):
    folder, gguf = demo_gguf_or_skip()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf).eval()
    cfg = WushConfig(format="mxfp4", method="rtn", transform="wush")
    layer = model.model.layers[0]
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        parent, _, child = name.rpartition(".")
        lin = layer.get_submodule(name)
        setattr(layer.get_submodule(parent), child, calibrate.quantize_linear(lin, None, cfg, name=name))
    x = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    hf.attach(model)  # layers assembled by hand: mark the model (replaces the GGUF loader's quantizer)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, WushLinear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_state(model, loaded)
    assert torch.equal(logits(model, x), logits(loaded, x))


# --------------------------------------------------------------------------------------------------------------
# Other ways of loading
# --------------------------------------------------------------------------------------------------------------


def test_sharded_checkpoint(tmp_path):
    model = tiny_llama(seed=4)
    quantize_model(model, WushConfig(format="nvfp4", method="rtn", transform="wush"))
    model.save_pretrained(tmp_path / "ok", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "ok").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ok" / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ok")
    assert_same_state(model, loaded)
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))
    # a tensor missing from one shard: named, with the checkpoint's directory
    d = copy_ckpt(tmp_path / "ok", tmp_path / "bad")
    tensor = f"{Q}.weight_scales"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][tensor]
    tensors = load_file(shard)
    tensors.pop(tensor)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    assert str(d) in str(err.value) and f"'{tensor}'" in str(err.value), str(err.value)


def test_load_with_another_dtype_keeps_the_quantized_buffers(saved):
    """dtype=bfloat16 casts the high-precision weights; the calibrated buffers stay exactly as saved."""
    model, d = saved
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, mod in model.named_modules():
        if isinstance(mod, WushLinear):
            got = loaded.get_submodule(name)
            for buf_name, buf in mod.named_buffers():
                assert getattr(got, buf_name).dtype == buf.dtype and torch.equal(getattr(got, buf_name), buf), name
    assert torch.isfinite(logits(loaded, ids()).float()).all()


def test_base_model_loads_from_a_causal_lm_checkpoint(tmp_path):
    from transformers import AutoModel

    model = tiny_llama(seed=6)
    quantize_model(model, WushConfig(format="mxfp4", method="rtn"), include_lm_head=True)
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base.layers[0].self_attn.q_proj, WushLinear)
    x = ids()
    with torch.no_grad():
        want = model.model(x).last_hidden_state
        got = base(x).last_hidden_state
    assert torch.equal(want, got)
