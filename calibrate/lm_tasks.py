"""Local lm-evaluation-harness tasks over text files (no hub download): what ``wush eval --tasks`` runs in the
tests and the measured SmolLM2 figures.

:func:`write_rolling_task` writes a JSON-lines file of documents and a task YAML (``output_type:
loglikelihood_rolling``, lm_eval's word / byte perplexity and bits per byte) reading it through the ``json``
builder of ``datasets``; pass the folder as ``--include-path``. :func:`continuation_items` +
:func:`write_choice_task` make a zero-shot multiple-choice task of the same kind from any text: the start of a
paragraph, its true continuation and continuations of other paragraphs of the same text as distractors (lm_eval's
``acc`` and length-normalized ``acc_norm``).
"""

from __future__ import annotations

import json
import os
import random

__all__ = ["write_rolling_task", "split_documents", "continuation_items", "long_paragraphs", "write_choice_task"]


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
    return _write_task(folder, name, [{"text": doc} for doc in documents], """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")


def continuation_items(text: str, n: int, *, context_words: int = 48, continuation_words: int = 12,
                       n_choices: int = 4, seed: int = 0) -> list[dict]:
    """``n`` zero-shot multiple-choice items from the paragraphs of ``text``: each holds ``context`` (the first
    ``context_words`` words of a paragraph), ``choices`` (its next ``continuation_words`` words and the words at the
    same place of ``n_choices - 1`` other paragraphs, shuffled) and ``gold`` (the true one's index). Deterministic
    for a given ``seed``."""
    if n < 1 or n_choices < 2 or context_words < 1 or continuation_words < 1:
        raise ValueError(f"continuation_items: n={n}, n_choices={n_choices}, context_words={context_words} and "
                         f"continuation_words={continuation_words} must be >= 1 (n_choices >= 2)")
    need = context_words + continuation_words
    paras = long_paragraphs(text, need)
    if len(paras) < max(n, n_choices):
        raise ValueError(f"the text holds {len(paras)} paragraphs of >= {need} words, fewer than the "
                         f"{max(n, n_choices)} needed; pass a longer text or ask for fewer items")
    rng = random.Random(seed)
    conts = [" ".join(w[context_words:need]) for w in paras]
    items = []
    for i in range(n):
        others = [j for j in range(len(paras)) if j != i and conts[j] != conts[i]]
        if len(others) < n_choices - 1:
            raise ValueError(f"paragraph {i} has fewer than {n_choices - 1} distinct distractors; ask for fewer choices")
        picks = [i, *rng.sample(others, n_choices - 1)]
        rng.shuffle(picks)
        items.append({"context": " ".join(paras[i][:context_words]), "choices": [" " + conts[j] for j in picks],
                      "gold": picks.index(i)})
    return items


def long_paragraphs(text: str, min_words: int) -> list[list[str]]:
    """The words of each blank-line separated paragraph of ``text`` with at least ``min_words`` words (what
    :func:`continuation_items` draws its items from)."""
    return [w for w in (p.split() for p in text.split("\n\n")) if len(w) >= min_words]


def write_choice_task(folder: str | os.PathLike, name: str, items: list[dict]) -> str:
    """``folder/NAME.jsonl`` + ``folder/NAME.yaml``: an lm_eval ``multiple_choice`` task over ``items`` (as
    :func:`continuation_items` makes them), metrics ``acc`` and ``acc_norm``. Returns the task name."""
    if not items:
        raise ValueError("write_choice_task: no items")
    for k, it in enumerate(items):
        if not (isinstance(it.get("context"), str) and isinstance(it.get("choices"), list) and len(it["choices"]) >= 2
                and isinstance(it.get("gold"), int) and 0 <= it["gold"] < len(it["choices"])):
            raise ValueError(f"write_choice_task: item {k} needs 'context', >= 2 'choices' and a 'gold' index into "
                             f"them, got {it!r:.200}")
    rows = [{"context": it["context"], "choices": it["choices"], "gold": it["gold"]} for it in items]
    return _write_task(folder, name, rows, """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")


def _write_task(folder: str | os.PathLike, name: str, rows: list[dict], body: str) -> str:
    """``folder/NAME.jsonl`` (one JSON object per row) and ``folder/NAME.yaml`` (the json builder of ``datasets``
    reading it, then ``body``: the output type, fields and metrics). Returns ``name``."""
    os.makedirs(folder, exist_ok=True)
    data = os.path.abspath(os.path.join(folder, f"{name}.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    yaml = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(data)}
test_split: test
should_decontaminate: false
metadata:
  version: 1.0
""" + body
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(yaml)
    return name
