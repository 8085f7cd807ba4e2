"""Calibration methods: named settings of calibrate (passes, token scaling, tokens, centring).

``calibrate(method=...)`` and ``--method`` take one; an explicit ``passes``, ``max_tokens`` or
``token_scaled_roles`` overrides that part of it. The sweep compares them on the same axis
(scap_onnx.experiments.sweep); docs/calibration.md has the measurements behind the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ScapError
from .spec import TOKEN_SCALED_ROLES


@dataclass(frozen=True)
class Method:
    name: str
    passes: int  # 1: dense activations; more: upstream targets sparsified (calibrator)
    token_scaled_roles: tuple[str, ...]
    max_tokens: int
    centring: str  # stats.CENTRINGS
    summary: str
    weighted: bool = False  # thresholds on |x_k - m| * ||W_k|| (calibration.weighting)


METHODS = {m.name: m for m in (
    Method("scap-margin", 1, (), 16384, "margin",
           "dense activations, static thresholds, a centre other than zero only where it cuts the output error by 10 %"),
    Method("balanced", 2, (), 16384, "balanced",
           "upstream-aware, static thresholds, centres whose dropped values average them"),
    Method("scap-search", 2, TOKEN_SCALED_ROLES, 16384, "search",
           "upstream-aware, token-scaled o/down, least-output-error offset candidate (the default until issue 16)"),
    Method("oneshot", 1, (), 2048, "mode-down",
           "dense activations, 2,048 tokens, static thresholds, histogram mode for down only"),
    Method("wina", 1, (), 16384, "margin",
           "as scap-margin, but each channel's threshold divided by the norm of its weight row (WINA-style)",
           weighted=True),
)}
DEFAULT_METHOD = "scap-margin"


def get_method(name: str | None) -> Method:
    if name is None:
        name = DEFAULT_METHOD
    try:
        return METHODS[name]
    except KeyError:
        raise ScapError(f"unknown calibration method {name!r} (methods: {', '.join(METHODS)})") from None
