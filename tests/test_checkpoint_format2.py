"""Checkpoint format 2: loud failure without the wush quantizer, integrity of every tensor and of the config,
MXFP4 row exponents, the explicit save path, and format-1 checkpoints (written by the code of 44458ff) loading.

Tiny random Llama models as in test_checkpoint.py (no downloads).
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
from transformers import AutoModelForCausalLM

import wush_compile  # noqa: F401
from wush_compile import WushConfig, WushLinear, formats, hf
from wush_compile.hf import CheckpointError

from .test_checkpoint import _tensor_byte_range, copy_ckpt, ids, logits, quantize_model, tiny_llama

V1 = Path(__file__).parent / "data" / "ckpt_v1_mxfp4"  # written by tests/data/README.md's script at 44458ff


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama(seed=2)
    cfg = WushConfig(format="mxfp4", method="rtn", transform="wush")
    quantize_model(model, cfg)
    hf.attach(model, cfg)
    d = tmp_path_factory.mktemp("fmt2")
    model.save_pretrained(d)
    return model, d


def _run_fresh(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter of this venv that must never import wush_compile (checked at exit)."""
    script = tmp_path / "fresh.py"
    script.write_text(code + "\nimport sys\nassert 'wush_compile' not in sys.modules, 'wush_compile was imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )


# --------------------------------------------------------------------------------------------------------------
# Without the quantizer: loud, never random weights
# --------------------------------------------------------------------------------------------------------------


def test_load_without_importing_wush_compile_fails_loudly(saved, tmp_path):
    _, d = saved
    code = (
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(d)!r})\n"
        "except RuntimeError as err:\n"
        "    print('REFUSED', err)\n"
        "else:\n"
        "    print('LOADED')\n"
    )
    out = _run_fresh(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED" in out.stdout and "ignore_mismatched_sizes" in out.stdout, out.stdout + out.stderr[-3000:]
    # the load report names the quantized Linears' weights as the mismatch
    assert "MISMATCH" in out.stderr and "q_proj.weight" in out.stderr, out.stderr[-3000:]


def test_deleted_quantization_config_does_not_load_random_linears(saved, tmp_path):
    d = copy_ckpt(saved[1], tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(d)


def test_save_pretrained_is_not_patched_by_the_import(tmp_path):
    code = (
        "from transformers import PreTrainedModel\n"
        "before = PreTrainedModel.save_pretrained\n"
        "import sys; sys.path.insert(0, %r)\n"
        "import wush_compile\n"
        "assert PreTrainedModel.save_pretrained is before, 'save_pretrained was replaced'\n"
        "print('ok')\n"
    ) % str(Path(__file__).resolve().parents[1])
    script = tmp_path / "p.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_calibrated_model_saves_through_the_quantizer_hook(saved):
    """No wrapper: the quantizer attached by attach()/calibrate() writes the guards and the integrity tensor."""
    model, d = saved
    assert isinstance(model.hf_quantizer, hf.WushHfQuantizer)
    tensors = load_file(d / "model.safetensors")
    assert hf.INTEGRITY_TENSOR in tensors and tensors["model.layers.1.mlp.down_proj.weight"].shape == (0,)
    loaded = AutoModelForCausalLM.from_pretrained(d)
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))


# --------------------------------------------------------------------------------------------------------------
# Integrity: every tensor, the config, every level of the config
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor", ["model.norm.weight", "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"]
)
def test_flipped_byte_in_a_high_precision_tensor(saved, tmp_path, tensor):
    d = copy_ckpt(saved[1], tmp_path)
    path = d / "model.safetensors"
    start, end = _tensor_byte_range(path, tensor)
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    msg = str(err.value)
    assert str(path) in msg and f"'{tensor}'" in msg and "CRC-32" in msg, msg


def _edit_qc(d: Path, fn) -> None:
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg["quantization_config"])
    path.write_text(json.dumps(cfg, indent=2))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda qc: qc.__setitem__("format", "nvfp4"), "calibration.format"),
        (lambda qc: qc["calibration"].__setitem__("format", "nvfp4"), "calibration.format"),
        (lambda qc: qc.__setitem__("transform", "hadamard"), "calibration.transform"),
        (lambda qc: qc.__setitem__("method", "gptq"), "calibration.method"),
        (lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].__setitem__("transform_kind", "identity"), "modules"),
    ],
)
def test_config_levels_must_agree(saved, tmp_path, edit, needle):
    d = copy_ckpt(saved[1], tmp_path)
    _edit_qc(d, edit)
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    assert needle in str(err.value) and "config.json" in str(err.value), str(err.value)


def test_consistent_edit_of_every_level_is_caught_by_the_config_checksum(saved, tmp_path):
    """transform wush -> hadamard at the top, in calibration and in every module: shapes still fit, CRC does not."""
    d = copy_ckpt(saved[1], tmp_path)

    def edit(qc):
        qc["transform"] = "hadamard"
        qc["calibration"]["transform"] = "hadamard"
        for entry in qc["modules"].values():
            entry["transform_kind"] = "hadamard"

    _edit_qc(d, edit)
    with pytest.raises(CheckpointError, match=r"quantization_config does not match the CRC-32"):
        AutoModelForCausalLM.from_pretrained(d)


def test_added_tensor_is_refused(saved, tmp_path):
    d = copy_ckpt(saved[1], tmp_path)
    path = d / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.extra"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.layers.0.extra' is not covered by the checksums"):
        AutoModelForCausalLM.from_pretrained(d)


# --------------------------------------------------------------------------------------------------------------
# Row exponents (MXFP4)
# --------------------------------------------------------------------------------------------------------------


def test_mx_row_reference_exponent():
    s = torch.tensor([[1, 130, 0xFF, 7], [0xFF, 0xFF, 0xFF, 0xFF], [0, 0, 0, 0], [254, 3, 0xFF, 254]], dtype=torch.uint8)
    got = formats.mx_row_reference_exponent(s)
    assert got.dtype == torch.int16 and got.tolist() == [130, -1, 0, 254]
    assert formats.mx_row_reference_exponent(torch.zeros(2, 0, dtype=torch.uint8)).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="uint8"):
        formats.mx_row_reference_exponent(s.to(torch.int16))


def test_row_exponents_set_by_calibration_saved_and_loaded(saved):
    model, d = saved
    tensors = load_file(d / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(d)
    for name, mod in model.named_modules():
        if isinstance(mod, WushLinear):
            want = formats.mx_row_reference_exponent(mod.weight_scales)
            assert torch.equal(mod.weight_row_exponent, want)
            assert torch.equal(tensors[f"{name}.weight_row_exponent"], want)
            assert torch.equal(loaded.get_submodule(name).weight_row_exponent, want)


def test_nvfp4_layers_have_no_row_exponent(tmp_path):
    model = tiny_llama(seed=5)
    quantize_model(model, WushConfig(format="nvfp4", method="rtn", transform="wush"))
    model.save_pretrained(tmp_path)
    assert not any(k.endswith("weight_row_exponent") for k in load_file(tmp_path / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].self_attn.q_proj.weight_row_exponent is None


def test_row_exponent_that_disagrees_with_the_scales(saved, tmp_path):
    d = copy_ckpt(saved[1], tmp_path)
    path = d / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.0.self_attn.q_proj.weight_row_exponent"
    tensors[key] = tensors[key] + 1
    qc = hf.WushQuantizationConfig.from_dict(json.loads((d / "config.json").read_text())["quantization_config"])
    tensors[hf.INTEGRITY_TENSOR] = hf.integrity_tensor(tensors, qc)  # consistent checksums: only the value is wrong
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"'{key}' does not match the row maxima"):
        AutoModelForCausalLM.from_pretrained(d)


# --------------------------------------------------------------------------------------------------------------
# dtype, explicit save
# --------------------------------------------------------------------------------------------------------------


def test_explicit_save_in_another_dtype(tmp_path):
    model = tiny_llama(seed=7)
    cfg = WushConfig(format="mxfp4", method="rtn", transform="hadamard")
    for name, mod in list(model.named_modules()):  # assembled by hand, no attach
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers"):
            import calibrate

            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, calibrate.quantize_linear(mod, None, cfg, name=name))
    codes = model.model.layers[0].self_attn.q_proj.weight_codes.clone()
    hf.save_pretrained(model, tmp_path, cfg, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.transform"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.q_proj.weight_global_scale"].dtype == torch.float32
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight_codes"], codes)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.wush_config(loaded) == cfg
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))


def test_dtype_at_load_and_to_after_load(saved):
    """``dtype=`` at load casts the high-precision weights and keeps the calibrated buffers exactly as saved
    (the transform stays in the stored dtype); ``.to(dtype)`` converts the transforms too. Both reach the same
    model once ``.to(dtype)`` is applied: bit-identical state and logits."""
    _, d = saved
    a = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    assert a.model.layers[0].self_attn.q_proj.transform.dtype == torch.float32
    a = a.to(torch.bfloat16)
    b = AutoModelForCausalLM.from_pretrained(d).to(torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert torch.equal(logits(a, ids()), logits(b, ids()))


# --------------------------------------------------------------------------------------------------------------
# Format 1 (written by main at 44458ff)
# --------------------------------------------------------------------------------------------------------------


def test_format_1_checkpoint_still_loads():
    assert json.loads((V1 / "config.json").read_text())["quantization_config"]["format_version"] == 1
    loaded = AutoModelForCausalLM.from_pretrained(V1)
    want = torch.load(V1 / "expected_logits.pt")
    assert torch.equal(logits(loaded, want["ids"]), want["logits"])
    q = loaded.model.layers[0].self_attn.q_proj
    assert torch.equal(q.weight_row_exponent, formats.mx_row_reference_exponent(q.weight_scales))


def test_format_1_checksums_still_checked(tmp_path):
    d = copy_ckpt(V1, tmp_path)
    path = d / "model.safetensors"
    tensor = "model.layers.0.self_attn.q_proj.weight_codes"
    start, end = _tensor_byte_range(path, tensor)
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"'{tensor}' does not match the CRC-32"):
        AutoModelForCausalLM.from_pretrained(d)


def test_resaving_a_format_1_checkpoint_writes_format_2(tmp_path):
    loaded = AutoModelForCausalLM.from_pretrained(V1)
    loaded.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == hf.FORMAT_VERSION == 3  # re-saved in the current format
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    want = torch.load(V1 / "expected_logits.pt")
    assert torch.equal(logits(again, want["ids"]), want["logits"])


def test_unattached_hand_assembled_model_refuses_a_plain_save(tmp_path):
    """WushLinears swapped into a model by hand, without hf.attach: save_pretrained raises instead of writing a
    checkpoint without quantization_config (which would load with random Linears); attached, it saves and loads."""
    from calibrate.layer import quantize_linear
    from wush_compile.errors import WushUserError

    model = tiny_llama(seed=4)
    cfg = WushConfig(format="mxfp4", method="rtn", transform="hadamard")
    mlp = model.model.layers[0].mlp
    mlp.down_proj = quantize_linear(mlp.down_proj, None, cfg, name="model.layers.0.mlp.down_proj")
    state = model.state_dict()  # a plain state_dict outside save_pretrained is fine
    assert "model.layers.0.mlp.down_proj.weight_codes" in state
    with pytest.raises(WushUserError, match=r"model.layers.0.mlp.down_proj\).*hf.attach\(model, config\)"):
        model.save_pretrained(tmp_path / "plain")
    assert not list((tmp_path / "plain").glob("*.safetensors"))
    hf.attach(model, cfg)
    model.save_pretrained(tmp_path / "wush")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "wush")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, WushLinear)
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))


# --------------------------------------------------------------------------------------------------------------
# Format 3: compact config.json
# --------------------------------------------------------------------------------------------------------------

V2 = Path(__file__).parent / "data" / "ckpt_v2_nvfp4"  # written by tests/data/README.md's script at e40b698


def test_format_2_checkpoint_still_loads_and_resaves_compact(tmp_path):
    loaded = AutoModelForCausalLM.from_pretrained(V2)
    want = torch.load(V2 / "expected_logits.pt")
    with torch.no_grad():
        assert torch.equal(loaded(want["ids"]).logits, want["logits"])
    old = json.loads((V2 / "config.json").read_text())["quantization_config"]
    assert old["format_version"] == 2 and all("in_features" in e for e in old["modules"].values())
    loaded.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 3 and set(qc["modules"]) == set(old["modules"])
    assert all(e == {} for e in qc["modules"].values()) and qc["dtype"] == "float32"
    assert os.path.getsize(tmp_path / "config.json") < os.path.getsize(V2 / "config.json")
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(want["ids"]).logits, want["logits"])


def test_compact_entries_keep_what_differs(tmp_path):
    """bias, share groups, another transform dtype and a mixed format are written per module; the rest is left out."""
    model = tiny_llama(seed=6, bias=True)
    quantize_model(model, WushConfig(format="mxfp4", method="rtn", transform="hadamard"))
    nv = "model.layers.0.mlp.down_proj"
    from calibrate.layer import quantize_linear

    lin = torch.nn.Linear(96, 64)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = quantize_linear(lin, None, WushConfig(format="nvfp4", method="rtn", transform="identity"), name=nv)
    model.model.layers[1].self_attn.q_proj.share_group = "g"
    hf.attach(model)
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed" and qc["transform"] == "mixed" and qc["dtype"] == "float32"
    entries = qc["modules"]
    assert entries[nv] == {"fmt": "nvfp4", "transform_kind": "identity", "bias": True}
    assert entries["model.layers.1.self_attn.q_proj"] == {"fmt": "mxfp4", "transform_kind": "hadamard",
                                                          "share_group": "g", "bias": True}
    assert entries["model.layers.1.mlp.up_proj"] == {"fmt": "mxfp4", "transform_kind": "hadamard", "bias": True}
    assert all("in_features" not in e and "out_features" not in e for e in entries.values())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    full = loaded.config.quantization_config.modules[nv]
    assert (full["in_features"], full["out_features"], full["bias"], full["dtype"]) == (96, 64, True, "float32")
    assert loaded.model.layers[1].self_attn.q_proj.share_group == "g"
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda qc: qc.__setitem__("dtype", "bfloat16"), "has dtype F32, expected BF16"),  # the default moves
        (lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].__setitem__("dtype", "bfloat16"), "dtype is 'float32'"),
        (lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].__setitem__("bias", True), "up_proj.bias' is missing"),
        (lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].__setitem__("share_group", "x"), "CRC-32"),
        (lambda qc: qc.__setitem__("dtype", "float64"), "float64"),
    ],
)
def test_compact_config_edits_are_refused(saved, tmp_path, edit, needle):
    d = copy_ckpt(saved[1], tmp_path)
    _edit_qc(d, edit)
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(d)
    assert needle in str(err.value) and ("config.json" in str(err.value) or str(d) in str(err.value)), str(err.value)
