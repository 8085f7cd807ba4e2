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

All plans run in one onnxruntime session over a weight-free copy of the model (calibration.capture)
in which every site is sparsified by an offset and a threshold fed at each run (a negative threshold
leaves it dense): :class:`PlanProbe`. Cost: (sites + 1) runs over ``GAIN_TOKENS`` tokens, and one
run per mix that :func:`apply_checked_budget` tries.

The gains are a model of how errors add; :func:`apply_checked_budget` does not trust it blindly. It
measures the allocated plan, the uniform plan of the same bytes (every site at B) and mixes of the
two (p = lam * allocated + (1 - lam) * B keeps the bytes exactly) by :meth:`PlanProbe.measure`: for a
causal LM the perplexity change on ``CHECK_TOKENS`` calibration tokens, elsewhere the relative
output error. Perplexity, not the logits' error: on SmolLM2 at B 0.3 the full allocation halves
the logits' error and the KL to dense, yet reads +3.9 % perplexity on pydoc where uniform reads
+0.8 % (docs/results.md).

Which mix it keeps (:func:`choose_mix`): the least loss, unless a more allocated mix is within one
standard error of it (the paired per-token NLL difference; a causal LM only), in which case the
most allocated such mix. At small budgets the mixes differ by less than the noise of 2,048 tokens
(on SmolLM2 at B 0.3: 0.005 nats against a standard error of 0.011), and a pick by noise alone
fell back to uniform where half the allocation measured better on both held-out texts; a mix is
given up for a less allocated one only when the loss says so beyond its noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph.model_io import ModelSource
from ..op.contract import Sparsification
from ..op.session import base_options
from ..progress import NullProgress, Progress, Task
from .budget import allocate, apply_allocation, error_curve
from .capture import Capture, Upstream
from .data import DataReader
from .lm_loss import ids_of, log_softmax, next_token_nll, real_tokens

#: Calibration tokens each site's output error is measured on (the first windows of the data).
GAIN_TOKENS = 512
#: Calibration tokens the check measures each mix's perplexity on (a causal LM's; the first windows).
CHECK_TOKENS = 2048
#: How the check picks its mix (recorded with it, and part of the sweep's cache key).
CHECK_RULE = ("least loss, or the most allocated mix within one standard error of it; "
              "non-finite losses last, uniform if none is finite")
_PROBE_PREFIX = "scap_probe::"
_ELEM = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}


@dataclass(frozen=True)
class Measured:
    """A plan's loss on the probe's data and, for a causal LM, its per-token NLL change against
    dense (``samples``), from which :func:`choose_mix` reads the noise of a difference of losses."""

    loss: float
    samples: np.ndarray | None = None


def _feeds(data: DataReader, tokens: int) -> tuple[list[dict], int]:
    out, seen = [], 0
    for feeds, n in data.batches():
        out.append(feeds)
        seen += n
        if seen >= tokens:
            break
    return out, seen


def _as_fed(value: float, dtype: str) -> np.ndarray:
    """A float32 scalar holding ``value`` as the site's type rounds it: what the rule reads from the
    rewritten node's attributes (a float16 model's constant path rounds to float16)."""
    return np.asarray(np.float16(value) if dtype == "float16" else value, np.float32)


class PlanProbe:
    """The model's first output (logits, or an encoder's hidden states) on the first ``tokens`` tokens
    of ``data`` under any plan, in one session: :meth:`error` of {site input: (offset, threshold)},
    the sites not named dense."""

    def __init__(self, sites, source: ModelSource, data: DataReader, threads: int | None = None,
                 providers=None, tokens: int = GAIN_TOKENS, check_tokens: int = CHECK_TOKENS):
        out = source.proto.graph.output[0]
        self._name = out.name  # logits, or an encoder's hidden states
        self._scalars: dict[str, tuple[str, str]] = {}
        entries = []
        for k, s in enumerate(sites):
            names = (f"{_PROBE_PREFIX}{k}/offset", f"{_PROBE_PREFIX}{k}/threshold")
            self._scalars[s.input] = names
            entries.append(Upstream(s.input, Sparsification(0.0, 0.0, s.token_scaled, s.threshold_scale),
                                    _ELEM[s.dtype], [t["name"] for t in s.targets], names))
        self._capture = Capture(source, {out.name: out.type.tensor_type.elem_type}, entries,
                                base_options(threads), providers)
        self._dtypes = {s.input: s.dtype for s in sites}
        self.feeds, self.tokens = _feeds(data, tokens)  # the first windows reaching ``tokens`` tokens
        self._dense = [self._output({}, f) for f in self.feeds]
        self._norm = float(np.sqrt(sum(float((y * y).sum()) for y in self._dense)))
        # a causal LM: the check reads perplexity (lm_loss) on more windows, holding only their NLL
        self.lm = out.name == "logits" and all(ids_of(f) is not None for f in self.feeds)
        if self.lm:
            self.check_feeds, self.check_tokens = _feeds(data, max(check_tokens, tokens))
            self._dense_nll = self._token_nll({})

    def _token_nll(self, plan) -> np.ndarray:
        """Next-token NLL (float64) of every real token of the check windows under ``plan``."""
        out = []
        for f in self.check_feeds:
            ids = ids_of(f)
            mask = next((v for k, v in f.items() if "attention_mask" in k), None)
            out.append(next_token_nll(log_softmax(self._output(plan, f)), ids, real_tokens(ids, mask)))
        return np.concatenate(out).astype(np.float64) if out else np.empty(0)

    def _output(self, plan: dict[str, tuple[float, float]], feeds: dict) -> np.ndarray:
        full = dict(feeds)
        for site, names in self._scalars.items():
            offset, threshold = plan.get(site, (0.0, -1.0))
            full[names[0]] = _as_fed(offset, self._dtypes[site])  # run_session drops what the graph does not read
            full[names[1]] = _as_fed(threshold, self._dtypes[site])
        return self._capture.run(full)[self._name].astype(np.float64)

    def error(self, plan: dict[str, tuple[float, float]]) -> float:
        """||y_plan - y|| / ||y|| over the probe's tokens, y the dense output."""
        if self._norm <= 0:
            return 0.0
        sq = sum(float(((self._output(plan, f) - y) ** 2).sum()) for f, y in zip(self.feeds, self._dense))
        return float(np.sqrt(sq) / self._norm)

    def measure(self, plan: dict[str, tuple[float, float]]) -> Measured:
        """What the check compares plans by: a causal LM's relative perplexity change on the check
        windows (exp(NLL_plan - NLL_dense) - 1, with the per-token NLL changes), else :meth:`error`."""
        if not self.lm:
            return Measured(self.error(plan))
        delta = self._token_nll(plan) - self._dense_nll
        return Measured(float(np.expm1(delta.mean())) if delta.size else 0.0, delta)

    @property
    def criterion(self) -> str:
        return (f"perplexity change on {self.check_tokens} tokens" if self.lm
                else f"relative output error on {self.tokens} tokens")


def site_scalars(site, sparsity: float, centring: str | None = None) -> tuple[float, float]:
    """(offset, threshold) that sparsify ``site`` (a SiteStats) at ``sparsity`` with ``centring``
    (default: the site's own)."""
    _, m = site.choose_offset(sparsity, centring)
    return float(m), float(site.tau(sparsity, m))


def measure_gains(stats, probe: PlanProbe, sparsity: float, centring: str | None = None,
                  task: Task | None = None) -> None:
    """Set every site's ``gain`` (in place) from its output error at ``sparsity`` with ``centring``
    (default: the site's own), the centring the allocation then uses. A site whose layer error
    there is 0 (inputs mostly exact zeros) tells nothing of its gain: it gets the median of the
    others, not 0, which would let the allocation drop it whole."""
    errors = {}
    for s in stats.sites:
        errors[s.input] = probe.error({s.input: site_scalars(s, sparsity, centring)})
        if task is not None:
            task.advance()
    layer = {}
    for s in stats.sites:
        p, e = error_curve(s, centring)
        layer[s.input] = float(np.interp(sparsity, p, e))
    gains = {k: errors[k] / v for k, v in layer.items() if v > 0}
    fallback = float(np.median(list(gains.values()))) if gains else 1.0
    for s in stats.sites:
        s.gain = float(gains.get(s.input, fallback))
    stats.calibration["gain"] = {"sparsity": float(sparsity), "tokens": probe.tokens}


#: Mixes of the allocated plan with the uniform one that the check measures (1: as allocated).
MIXES = (1.0, 0.75, 0.5, 0.25, 0.0)


def apply_checked_budget(stats, probe: PlanProbe, budget: float, centring: str | None = None,
                         progress: Progress | None = None, measure_gain: bool = True):
    """Gains measured at ``budget`` (:func:`measure_gains`; ``measure_gain=False``: the sites carry
    them already), then :func:`apply_checked_allocation` (in place; returns ``stats``)."""
    steps = (len(stats.sites) if measure_gain else 0) + len(MIXES)
    task = (progress or NullProgress()).task(f"budget {budget:g}: {'gains and ' if measure_gain else ''}check", steps)
    try:
        if measure_gain:
            measure_gains(stats, probe, budget, centring, task)
        return apply_checked_allocation(stats, probe, budget, centring, task)
    finally:
        task.close()


def paired_se(d: np.ndarray) -> float:
    """Standard error of the mean of paired per-token differences ``d``, tokens taken as independent
    (tokens of one window are not, so it likely underestimates the noise)."""
    return float(d.std(ddof=1)) / np.sqrt(d.size) if d.size > 1 else np.inf


def choose_mix(measured: dict[float, Measured]) -> float:
    """The mix the check keeps (:data:`CHECK_RULE`): the one of least loss, unless a more allocated
    one is within one :func:`paired_se` of it (causal LMs: per-token samples), then the most
    allocated such mix. A plan whose outputs overflow (a loss not finite) is never kept; if no plan
    has a finite loss, uniform is."""
    finite = [lam for lam in measured if np.isfinite(measured[lam].loss)]
    if not finite:
        return 0.0
    best = min(finite, key=lambda lam: (measured[lam].loss, -lam))

    def within_noise(lam: float) -> bool:
        a, b = measured[lam].samples, measured[best].samples
        if a is None or b is None or a.shape != b.shape:
            return False
        d = a - b
        return bool(np.isfinite(d).all()) and float(d.mean()) <= paired_se(d)

    return max(lam for lam in finite if lam == best or (lam > best and within_noise(lam)))


def mix_sparsities(sites, budget: float, centring: str | None = None) -> dict[float, dict[str, float]]:
    """For each mix lam of :data:`MIXES`, every site's sparsity lam * allocated + (1 - lam) * B: the
    allocation from the stored gains (calibration.budget) and the uniform plan, both at B of the bytes."""
    alloc = allocate(sites, budget, centring)
    return {lam: {s.input: lam * alloc[s.input] + (1.0 - lam) * budget for s in sites} for lam in MIXES}


def probe_plan(sites, sparsities: dict[str, float], centring: str | None = None) -> dict[str, tuple[float, float]]:
    """The (offset, threshold) of every site at its sparsity in ``sparsities`` (0: left dense), for
    :meth:`PlanProbe.measure`."""
    return {s.input: site_scalars(s, p, centring) for s in sites if (p := sparsities[s.input]) > 0.0}


def apply_checked_allocation(stats, probe: PlanProbe, budget: float, centring: str | None = None,
                             task: Task | None = None):
    """Every mix of :func:`mix_sparsities` measured, and the one :func:`choose_mix` keeps applied to
    ``stats`` (in place; returned). What every mix measured is recorded in
    ``stats.calibration["budget_check"]``, with the centring that rebuilds the mixes."""
    mixes = mix_sparsities(stats.sites, budget, centring)
    measured = {}
    for lam, mix in mixes.items():
        measured[lam] = probe.measure(probe_plan(stats.sites, mix, centring))
        if task is not None:
            task.advance()
    kept = choose_mix(measured)
    apply_allocation(stats, mixes[kept], budget, centring)
    stats.calibration["budget_check"] = {"mix": kept, "criterion": probe.criterion, "rule": CHECK_RULE,
                                         "centring": centring,
                                         "errors": {f"{lam:g}": m.loss for lam, m in measured.items()}}
    return stats
