"""Weight-aware (WINA-style) thresholds: each input channel k weighted by the norm of its weight row.

A channel's contribution to the output is x_k * W_k (W_k: row k of the [K, N] weight), so the
``wina`` method drops by the score |x_k - m| * w_k with w_k = ||W_k||_2 rather than by |x_k - m|.
Where several targets read one input (q/k/v, gate/up) w_k is the norm over all their rows:
sqrt(sum of the squared row norms). The op's rule |x_k - m| <= threshold * threshold_scale[k]
expresses it with threshold_scale[k] = c / w_k and threshold = t / c, c the median of the positive
norms (so the scale's median is 1); w_k = 0 gives a scale of +inf: that channel never matters, and
the op drops it. t is a quantile of the score over calibration tokens and channels, from a
histogram of (x - m) * w collected as the activations stream (calibrator), stored in stats.json.
"""

from __future__ import annotations

import numpy as np


def channel_norms(weights: list[np.ndarray]) -> np.ndarray:
    """w_k = sqrt(sum over the [K, N] weights of ||W[k, :]||^2), float64 [K]."""
    sq = np.zeros(weights[0].shape[0], dtype=np.float64)
    for w in weights:
        sq += np.einsum("kn,kn->k", w, w, dtype=np.float64)
    return np.sqrt(sq)


def norm_constant(norms: np.ndarray) -> float:
    """c: the median of the positive norms (1 when none is positive)."""
    pos = norms[norms > 0]
    return float(np.median(pos)) if pos.size else 1.0


def threshold_scale(norms: np.ndarray) -> np.ndarray:
    """float32 [K]: c / w_k, +inf where w_k = 0."""
    c = norm_constant(norms)
    with np.errstate(divide="ignore"):
        return np.where(norms > 0, c / np.where(norms > 0, norms, 1.0), np.inf).astype(np.float32)


def scores(x: np.ndarray, centre: float, norms: np.ndarray) -> np.ndarray:
    """(x - m) * w per element (float32, the signed score whose magnitude the rule thresholds)."""
    return (x - np.float32(centre)) * norms.astype(np.float32)
