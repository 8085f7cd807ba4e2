"""stats.json: calibration statistics per sparsified input, and the model they came from.

Per site (an input tensor shared by one or more target MatMuls): its targets (name, role, layer,
weight, K, N, bias), the histogram of its values, the offset candidates (mode, kde, median, zero)
with the relative output error each causes at a grid of sparsities, and the offset/threshold
chosen for the calibration SPEC; for the ``wina`` method (calibration.weighting) also the
channels' weight norms and a histogram of the score (x - m) * w at the site's centre m, which then
give the thresholds and threshold_scale. ``plan(spec)`` re-targets any SPEC from the stored histograms and
errors without running the model again. ``model.fingerprint`` identifies the source model; a
stats file is refused for any other model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ScapError
from ..graph.fileio import atomic_write_text
from .histogram import Histogram, balanced_centre, fine_mode
from .weighting import norm_constant, threshold_scale
from .spec import Spec, parse_spec, shared_sparsity

FORMAT = "scap-onnx-stats"
VERSION = 1
#: Candidate order used to break ties in output error (zero first: no change unless it helps).
CANDIDATE_ORDER = ("zero", "median", "mode", "kde")
#: How a site's centre m is chosen (SiteStats.centring; docs/calibration.md compares them):
#: ``margin``    the least-error offset candidate where it cuts the output error by CENTRE_MIN_GAIN
#:               or more against zero, else zero;
#: ``balanced``  the centre whose dropped values average it (histogram.balanced_centre), per sparsity;
#: ``search``    the offset candidate with the least output error on the sampled rows (SCAP's search);
#: ``mode-down`` the histogram's mode for inputs of down projections, zero elsewhere (the one-shot);
#: ``zero``      no centring (TEAL).
CENTRINGS = ("margin", "balanced", "search", "mode-down", "zero")
#: A non-zero centre costs more than the output error on the sampled rows shows: every dropped
#: element of a channel that sits near zero becomes -m, the same error at every token, which the
#: residual stream carries to all later layers. Centres that cut that error by under 2 % (every
#: input of SmolLM2, MiniLM's q/k/v, o and up) cost 1-2 points of perplexity end to end, those that
#: cut it by over 50 % (MiniLM's post-GELU down inputs) gain several; any margin in between makes
#: the same choices (docs/calibration.md).
CENTRE_MIN_GAIN = 0.1


def same_sparsity(a: float, b: float) -> bool:
    """Equal up to how SPECs are stored in stats files (6 significant digits)."""
    return abs(a - b) <= 1e-6


@dataclass
class SiteStats:
    input: str
    targets: list[dict]
    dtype: str
    histogram: Histogram
    candidates: dict[str, float] = field(default_factory=dict)
    error_grid: list[float] = field(default_factory=list)
    errors: dict[str, list[float]] = field(default_factory=dict)
    sparsity: float | None = None  # calibration SPEC's target for this site (None: left dense)
    offset: float = 0.0
    offset_kind: str = "zero"
    threshold: float = 0.0
    token_scaled: bool = False  # histogram, offset and threshold are of x / ||x|| (scap_onnx.op.token_norm)
    centring: str = "search"  # one of CENTRINGS
    # weight-aware thresholds (method wina): w_k per input channel, and the histogram of (x - m) * w
    # at m = score_centre, the site's centre whatever the SPEC (the scores were collected at it)
    channel_norms: list[float] | None = None
    score_histogram: Histogram | None = None
    score_centre: float = 0.0
    # byte-budget allocation: the model's output error per unit of this site's layer error
    # (calibration.sensitivity), None where not measured
    gain: float | None = None

    @property
    def roles(self) -> list[str]:
        return list(dict.fromkeys(t["role"] for t in self.targets))

    @property
    def layer(self) -> int | None:
        return self.targets[0].get("layer")

    @property
    def k(self) -> int:
        return int(self.targets[0]["k"])

    @property
    def weighted(self) -> bool:
        return self.score_histogram is not None and self.channel_norms is not None

    @property
    def threshold_scale(self) -> tuple[float, ...] | None:
        """The op's threshold_scale for weight-aware thresholds (c / w_k), None otherwise."""
        return tuple(threshold_scale(np.asarray(self.channel_norms)).tolist()) if self.weighted else None

    def tau(self, sparsity: float, offset: float) -> float:
        """The op's threshold giving ``sparsity`` on the calibration data: the quantile of |x - offset|,
        or for weight-aware sites the quantile of the score divided by the norm constant c."""
        if self.weighted:
            return self.score_histogram.threshold(sparsity, 0.0) / norm_constant(np.asarray(self.channel_norms))
        return self.histogram.threshold(sparsity, offset)

    def threshold_for(self, sparsity: float, offset: float, site_sparsity: float, site_threshold: float) -> float:
        """A target's threshold at ``sparsity``: the site's own when the site was decided for it (to
        float formatting), else :meth:`tau`."""
        if same_sparsity(sparsity, site_sparsity):
            return site_threshold
        return self.tau(sparsity, offset)

    def sparsity_for(self, spec: Spec) -> float | None:
        """The site's sparsity under ``spec``: mean over its targets that the SPEC names."""
        vals = [spec.sparsity(t["role"]) for t in self.targets]
        vals = [v for v in vals if v is not None]
        return shared_sparsity(vals)

    def choose_offset(self, sparsity: float, centring: str | None = None) -> tuple[str, float]:
        """(kind, centre) at ``sparsity`` by ``centring`` (default: the site's own; see CENTRINGS)."""
        if self.weighted:  # the scores were collected at this centre
            return self.offset_kind, self.score_centre
        rule = centring or self.centring
        if rule == "zero":
            return "zero", 0.0
        if rule == "mode-down":
            return ("mode", fine_mode(self.histogram)) if "down" in self.roles else ("zero", 0.0)
        if rule == "balanced":
            return "balanced", balanced_centre(self.histogram, sparsity)
        if rule not in ("search", "margin"):
            raise ScapError(f"unknown centring {rule!r} (known: {', '.join(CENTRINGS)})")
        kind, m = self._least_error_candidate(sparsity)
        if rule == "margin" and kind != "zero" and "zero" in self.errors:
            grid = np.asarray(self.error_grid)
            zero = float(np.interp(sparsity, grid, np.asarray(self.errors["zero"])))
            best = float(np.interp(sparsity, grid, np.asarray(self.errors[kind])))
            if best > (1.0 - CENTRE_MIN_GAIN) * zero:
                return "zero", 0.0
        return kind, m

    def _least_error_candidate(self, sparsity: float) -> tuple[str, float]:
        """Candidate with the least output error at ``sparsity`` (errors interpolated on the grid)."""
        if not self.candidates:
            return "zero", 0.0
        if not self.errors or not self.error_grid:
            kind = "zero" if "zero" in self.candidates else next(iter(self.candidates))
            return kind, self.candidates[kind]
        grid = np.asarray(self.error_grid)
        best = None
        for kind in sorted(self.candidates, key=lambda k: CANDIDATE_ORDER.index(k) if k in CANDIDATE_ORDER else 99):
            e = float(np.interp(sparsity, grid, np.asarray(self.errors[kind])))
            if best is None or e < best[0] * (1 - 1e-9) - 1e-15:
                best = (e, kind)
        return best[1], self.candidates[best[1]]

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "roles": self.roles,
            "layer": self.layer,
            "k": self.k,
            "dtype": self.dtype,
            "targets": self.targets,
            "sparsity": self.sparsity,
            "offset": self.offset,
            "offset_kind": self.offset_kind,
            "threshold": self.threshold,
            "token_scaled": self.token_scaled,
            "centring": self.centring,
            "candidates": self.candidates,
            "error_grid": self.error_grid,
            "errors": self.errors,
            "count": self.histogram.total,
            "histogram": self.histogram.to_dict(),
            **({"channel_norms": self.channel_norms, "score_centre": self.score_centre,
                "score_histogram": self.score_histogram.to_dict()} if self.weighted else {}),
            **({"gain": self.gain} if self.gain is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SiteStats":
        return cls(
            input=d["input"],
            targets=list(d["targets"]),
            dtype=d.get("dtype", "float32"),
            histogram=Histogram.from_dict(d["histogram"]),
            candidates={k: float(v) for k, v in d.get("candidates", {}).items()},
            error_grid=[float(x) for x in d.get("error_grid", [])],
            errors={k: [float(x) for x in v] for k, v in d.get("errors", {}).items()},
            sparsity=None if d.get("sparsity") is None else float(d["sparsity"]),
            offset=float(d.get("offset", 0.0)),
            offset_kind=d.get("offset_kind", "zero"),
            threshold=float(d.get("threshold", 0.0)),
            token_scaled=bool(d.get("token_scaled", False)),
            centring=str(d.get("centring", "search")),  # files written before centrings existed searched
            channel_norms=[float(v) for v in d["channel_norms"]] if "channel_norms" in d else None,
            score_histogram=Histogram.from_dict(d["score_histogram"]) if "score_histogram" in d else None,
            score_centre=float(d.get("score_centre", 0.0)),
            gain=float(d["gain"]) if d.get("gain") is not None else None,
        )


@dataclass(frozen=True)
class TargetPlan:
    """What the rewriter does to one target MatMul."""

    name: str
    role: str
    input: str
    threshold: float
    offset: float
    sparsity: float
    offset_kind: str
    token_scaled: bool = False  # the drop rule applies to the input divided by its norm per token
    threshold_scale: tuple[float, ...] | None = None  # per input channel (weight-aware thresholds)


@dataclass
class Stats:
    model: dict
    calibration: dict
    sites: list[SiteStats]

    # -- re-targeting
    def plan(self, spec: Spec | str | float | None = None, centring: str | None = None) -> dict[str, TargetPlan]:
        """Per target name: threshold and offset for ``spec`` (None: the calibration SPEC's values, or
        the sites' own after a --budget allocation), centres by ``centring`` (default: each site's
        own, CENTRINGS).

        Only targets whose role the SPEC names are in the plan. Targets sharing an input share the
        offset; they share the threshold too unless the SPEC gives their roles different sparsities
        (Phi-2's q/k/v and fc1 read one input): each then gets its own quantile.
        """
        out: dict[str, TargetPlan] = {}
        if spec is None and centring is not None:
            spec = self.calibration.get("spec")
        if spec is None:
            # a --budget plan (calibration.budget) is per site: each site's own sparsity
            by_spec = self.calibration.get("spec") and self.calibration.get("budget") is None
            cal = parse_spec(self.calibration["spec"]) if by_spec else None
            for s in self.sites:
                if s.sparsity is None:
                    continue
                for t in s.targets:
                    wanted = cal.sparsity(t["role"]) if cal is not None else s.sparsity
                    if wanted is not None:
                        out[t["name"]] = self._target_plan(s, t, wanted, s.threshold, s.offset, s.sparsity,
                                                           s.offset_kind)
            return out
        spec = parse_spec(spec)
        for s in self.sites:
            sp = s.sparsity_for(spec)
            if sp is None:
                continue
            kind, m = s.choose_offset(sp, centring)
            tau = s.tau(sp, m)
            for t in s.targets:
                wanted = spec.sparsity(t["role"])
                if wanted is not None:
                    out[t["name"]] = self._target_plan(s, t, wanted, tau, m, sp, kind)
        return out

    @staticmethod
    def _target_plan(site: SiteStats, target: dict, wanted: float, site_tau: float, offset: float,
                     site_sparsity: float, kind: str) -> TargetPlan:
        tau = site.threshold_for(wanted, offset, site_sparsity, site_tau)
        sparsity = site_sparsity if same_sparsity(wanted, site_sparsity) else wanted
        return TargetPlan(target["name"], target["role"], site.input, tau, offset, sparsity, kind, site.token_scaled,
                          site.threshold_scale)

    # -- identity
    def check_model(self, fingerprint: str, model_path: str | Path | None = None) -> None:
        if self.model.get("fingerprint") != fingerprint:
            src = self.model.get("path", "another model")
            raise ScapError(
                f"stats file was calibrated on a different model ({src}); recalibrate for {model_path or 'this model'}"
            )

    # -- files
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "calibration": self.calibration,
            "sites": [s.to_dict() for s in self.sites],
        }

    def save(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "Stats":
        p = Path(path)
        if not p.is_file():
            raise ScapError(f"stats file {p} does not exist")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ScapError(f"{p} is not a stats file (not JSON)") from None
        return cls.from_dict(d, p)

    @classmethod
    def from_dict(cls, d: dict, where: str | Path = "stats") -> "Stats":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ScapError(f"{where} is not a scap-onnx stats file")
        if d.get("version") != VERSION:
            raise ScapError(f"{where}: stats version {d.get('version')} is not supported (expected {VERSION})")
        try:
            sites = [SiteStats.from_dict(s) for s in d["sites"]]
            model = dict(d["model"])
            cal = dict(d.get("calibration", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ScapError(f"{where}: malformed stats file ({type(e).__name__}: {e})") from None
        for s in sites:
            if not math.isfinite(s.threshold) or s.threshold < 0 or not math.isfinite(s.offset):
                raise ScapError(f"{where}: site {s.input!r} has an invalid threshold/offset")
            if s.channel_norms is not None:
                norms = np.asarray(s.channel_norms)
                if norms.shape != (s.k,) or not (np.isfinite(norms) & (norms >= 0)).all():
                    raise ScapError(f"{where}: site {s.input!r} has invalid channel_norms")
            if s.gain is not None and not (math.isfinite(s.gain) and s.gain >= 0):
                raise ScapError(f"{where}: site {s.input!r} has an invalid gain")
            if s.centring not in CENTRINGS:
                raise ScapError(f"{where}: site {s.input!r} has an unknown centring {s.centring!r}")
        if "fingerprint" not in model:
            raise ScapError(f"{where}: stats file does not record its model")
        return cls(model, cal, sites)
