"""Held-out perplexity: ``exp(mean NLL)`` over non-overlapping chunks of the evaluation tokens."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: nn.Module, token_ids: torch.Tensor, seqlen: int, *, batch_size: int = 1, desc: str = "perplexity"
) -> float:
    """Perplexity of ``model`` on ``token_ids`` (1-D, or (1, T)) cut into ``T // seqlen`` chunks of ``seqlen``.

    Every chunk is scored independently (no context carried over); each predicts its tokens 1..seqlen-1. The
    remainder shorter than ``seqlen`` is dropped. Returns ``exp`` of the mean token NLL.
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point():
        raise TypeError("perplexity: token_ids must be an integer tensor of token ids")
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1:
        raise ValueError(f"perplexity: token_ids must be 1-D (T,), got shape {tuple(token_ids.shape)}")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"perplexity: seqlen must be an integer >= 2, got {seqlen!r}")
    chunks = token_ids.numel() // seqlen
    if chunks == 0:
        raise ValueError(
            f"perplexity: {token_ids.numel()} tokens do not fill one chunk of seqlen={seqlen}; lower seqlen or "
            "pass more text"
        )
    device = next(model.parameters()).device
    data = token_ids[: chunks * seqlen].reshape(chunks, seqlen).long()  # (chunks, seqlen)
    was_training = model.training
    model.eval()
    nll = 0.0
    count = 0
    try:
        for batch in tqdm(data.split(batch_size), desc=desc, unit="batch", leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, L, V)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    ppl = math.exp(nll / count)
    logger.info("%s: %.4f over %d chunks of %d tokens", desc, ppl, chunks, seqlen)
    return ppl
