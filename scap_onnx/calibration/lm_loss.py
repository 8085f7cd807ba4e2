"""A causal LM's next-token loss: the negative log-likelihood that perplexity is made of.

One home for the two places that need it: validate's accuracy metrics (scap_onnx.evaluation) and
the byte budget's check of its plans on calibration text (calibration.sensitivity), which must
measure plans by the loss users see, not only by how far the logits move.
"""

from __future__ import annotations

import numpy as np


def ids_of(feeds: dict) -> np.ndarray | None:
    """The token ids among a model's feeds (the input named like input_ids), or None."""
    for k, v in feeds.items():
        if "input_ids" in k:
            return v
    return None


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = x.max(-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def real_tokens(ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[B, S] bool: the positions holding real tokens (the attention mask where it fits ids)."""
    b, s = ids.shape
    return np.ones((b, s), bool) if mask is None or mask.shape != (b, s) else mask.astype(bool)


def next_token_nll(log_probs: np.ndarray, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """-log p(token t+1) at every position t where both t and t+1 are real tokens (1-D, float32):
    ``log_probs`` [B, S, V] from :func:`log_softmax` of the logits."""
    pv = valid[:, :-1] & valid[:, 1:]
    tgt = ids[:, 1:, None].astype(np.int64)
    return -np.take_along_axis(log_probs[:, :-1], tgt, -1)[..., 0][pv]
