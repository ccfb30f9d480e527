"""Local lm-evaluation-harness tasks over text files (no hub download): what ``wush eval --tasks`` runs in the
tests and the measured SmolLM2 figures.

:func:`write_rolling_task` writes a JSON-lines file of documents and a task YAML (``output_type:
loglikelihood_rolling``, lm_eval's word / byte perplexity and bits per byte) reading it through the ``json``
builder of ``datasets``; pass the folder as ``--include-path``.
"""

from __future__ import annotations

import json
import os

__all__ = ["write_rolling_task", "split_documents"]


def split_documents(text: str, n: int, min_chars: int = 200) -> list[str]:
    """The first ``n`` paragraphs (blank-line separated) of ``text`` with at least ``min_chars`` characters."""
    docs = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_chars]
    if len(docs) < n:
        raise ValueError(f"the text holds {len(docs)} paragraphs of >= {min_chars} characters, fewer than the {n} asked; "
                         "pass a longer text or ask for fewer documents")
    return docs[:n]


def write_rolling_task(folder: str | os.PathLike, name: str, documents: list[str]) -> str:
    """``folder/NAME.jsonl`` + ``folder/NAME.yaml``: an lm_eval task scoring the rolling log-likelihood of each
    document. Returns the task name."""
    if not documents:
        raise ValueError("write_rolling_task: no documents")
    os.makedirs(folder, exist_ok=True)
    data = os.path.abspath(os.path.join(folder, f"{name}.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    yaml = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(data)}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(yaml)
    return name
