"""Calibration statistics reused across runs of an experiment when nothing they depend on changed."""

from __future__ import annotations

from pathlib import Path

from ..api import model_fingerprint
from ..calibration.stats import Stats
from ..errors import ScapError


def reusable_stats(path: Path, model: Path, key: str, want: dict) -> Stats | None:
    """The stats in ``path`` when they belong to ``model`` and their calibration section ``key``
    (written by the experiment that saved them) equals ``want``; else None."""
    if not path.is_file():
        return None
    try:
        st = Stats.load(path)
    except ScapError:
        return None
    if st.model.get("fingerprint") != model_fingerprint(model) or st.calibration.get(key) != want:
        return None
    return st
