"""How much a site's own output error moves the model's output: its gain, for the byte-budget allocation.

A site's error curve (stats.json) is the relative error at its targets' outputs. What the allocation
must trade is the error at the model's output, and the same layer error costs very differently by
depth and role: on SmolLM2 an allocation by layer errors alone put the first and last layers at
60-85 % and lost three times TEAL-style's perplexity (docs/results.md). So each site is sparsified
alone, at the sparsity a uniform plan would give it, and the relative change of the model's first
output (logits, or an encoder's hidden states) over a few calibration windows is measured:
g_s = E_s / e_s, with E_s that output error and e_s the site's layer error there. The allocation
then minimises sum_s (g_s e_s(p_s))^2: the squared output error, taking the sites' errors as
independent (they add in quadrature) and each as linear in its layer error.

One onnxruntime session per site over a weight-free copy of the model (calibration.capture), the
dense outputs run once; cost: (sites + 1) runs over ``GAIN_TOKENS`` tokens.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph.model_io import ModelSource
from ..op.contract import Sparsification
from ..op.session import base_options
from .budget import error_curve
from .capture import Capture, Upstream
from .data import DataReader

#: Calibration tokens each site's output error is measured on (the first windows of the data).
GAIN_TOKENS = 512
_ELEM = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}


def _first_output(source: ModelSource) -> tuple[str, int]:
    out = source.proto.graph.output[0]
    return out.name, out.type.tensor_type.elem_type


def _feeds(data: DataReader, tokens: int) -> list[dict]:
    out, seen = [], 0
    for feeds, n in data.batches():
        out.append(feeds)
        seen += n
        if seen >= tokens:
            break
    return out


def output_errors(source: ModelSource, data: DataReader, entries: dict[str, Upstream], threads: int | None = None,
                  providers=None, tokens: int = GAIN_TOKENS) -> dict[str, float]:
    """Site input -> ||y_s - y|| / ||y|| on the first ``tokens`` tokens of ``data``, y the model's first
    output dense and y_s with that site alone sparsified by its entry."""
    name, elem = _first_output(source)
    feeds = _feeds(data, tokens)
    dense_cap = Capture(source, {name: elem}, None, base_options(threads), providers)
    dense = [dense_cap.run(f)[name].astype(np.float64) for f in feeds]
    del dense_cap
    norm = np.sqrt(sum(float((y * y).sum()) for y in dense))
    out = {}
    for site, entry in entries.items():
        cap = Capture(source, {name: elem}, [entry], base_options(threads), providers)  # options hold the data dir: one each
        sq = sum(float(((cap.run(f)[name] - y) ** 2).sum()) for f, y in zip(feeds, dense))
        out[site] = float(np.sqrt(sq) / norm) if norm > 0 else 0.0
        del cap
    return out


def site_entry(site, sparsity: float, centring: str | None = None) -> Upstream:
    """How the gain measurement sparsifies ``site`` (a SiteStats) at ``sparsity``: every target of it."""
    _, m = site.choose_offset(sparsity, centring)
    s = Sparsification(site.tau(sparsity, m), m, site.token_scaled, site.threshold_scale)
    return Upstream(site.input, s, _ELEM[site.dtype], [t["name"] for t in site.targets])


def measure_gains(stats, source: ModelSource, data: DataReader, sparsity: float, threads: int | None = None,
                  providers=None, tokens: int = GAIN_TOKENS) -> None:
    """Set every site's ``gain`` (in place) from its output error at ``sparsity`` with the site's own
    centring. A site whose layer error there is 0 (inputs mostly exact zeros) tells nothing of its
    gain: it gets the median of the others, not 0, which would let the allocation drop it whole."""
    entries = {s.input: site_entry(s, sparsity) for s in stats.sites}
    errors = output_errors(source, data, entries, threads, providers, tokens)
    layer = {}
    for s in stats.sites:
        p, e = error_curve(s)
        layer[s.input] = float(np.interp(sparsity, p, e))
    gains = {k: errors[k] / v for k, v in layer.items() if v > 0}
    fallback = float(np.median(list(gains.values()))) if gains else 1.0
    for s in stats.sites:
        s.gain = float(gains.get(s.input, fallback))
    stats.calibration["gain"] = {"sparsity": float(sparsity), "tokens": tokens}
