# Writes a format-2 checkpoint with the code of main at e40b698 (run with PYTHONPATH=/work/main).
import sys, torch, json
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
import calibrate, wush_compile
from wush_compile import WushConfig, hf
assert hf.FORMAT_VERSION == 2
out = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=112, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
model = LlamaForCausalLM._from_config(cfg, dtype=torch.float32).eval()
wc = WushConfig(format="nvfp4", method="rtn", transform="hadamard")
for name, mod in list(model.named_modules()):
    if isinstance(mod, nn.Linear) and name.startswith("model.layers"):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, calibrate.quantize_linear(mod, None, wc, name=name))
hf.attach(model, wc)
model.save_pretrained(out)
x = torch.randint(0, 112, (2, 11), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    torch.save({"ids": x, "logits": model(x).logits}, f"{out}/expected_logits.pt")
