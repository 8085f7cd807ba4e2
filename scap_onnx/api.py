"""Python API: the same operations as the command line.

    from scap_onnx.api import calibrate, rewrite, inspect
    stats = calibrate("model.onnx", "text.txt", sparsity="up=0.35,gate=0.35,down=0.55")
    stats.save("stats.json")
    result = rewrite("model.onnx", "sparse.onnx", stats="stats.json", sparsity="0.4")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .calibration.budget import apply_budget, parse_budget
from .calibration.calibrator import calibrate
from .calibration.spec import parse_spec
from .calibration.stats import Stats, TargetPlan
from .calibration.text import find_tokenizer
from .errors import ScapError
from .graph.fileio import missing_model_message, same_file
from .graph.genai import GenaiFolder, is_genai_folder, open_genai_folder, resolve_model, write_genai_folder
from .graph.model_io import external_files, fingerprint, load_model, load_proto
from .graph.targets import Target, find_all_targets, find_targets, group_sites, select_targets
from .graph.view import GraphView
from .op.library import get_library_path
from .op.nbits import DEFAULT_NBITS_SCALES, check_nbits_scales
from .passes.pipeline import Rewritten, rewrite_file
from .prepare import prepare_texts
from .progress import NullProgress, Progress

__all__ = ["calibrate", "rewrite", "inspect", "model_fingerprint", "RewriteResult", "Stats", "ScapError"]


def model_fingerprint(model: str | Path) -> str:
    """The identity stats files record (see scap_onnx.graph.model_io.fingerprint)."""
    model = resolve_model(model)
    proto = load_proto(model)
    return fingerprint(proto, Path(model).resolve().parent)


@dataclass
class RewriteResult:
    output: Path
    external_data: Path | None
    plan: dict[str, TargetPlan]
    stats: Stats
    rewritten: list[str] = field(default_factory=list)
    nodes: int = 0  # ScapSparseMatMul nodes written: fewer than targets where some were fused


def rewrite(
    model: str | Path,
    output: str | Path,
    *,
    stats: Stats | str | Path | None = None,
    data: str | Path | Sequence[str | Path] | None = None,
    sparsity: str | float | None = None,
    targets: str | None = None,
    check: bool = True,
    fuse: bool = True,
    progress: Progress | None = None,
    budget: float | None = None,
    nbits_scales: str = DEFAULT_NBITS_SCALES,
    **calibrate_kwargs,
) -> RewriteResult:
    """Rewrite ``model`` to ``output`` with thresholds from ``stats`` (a Stats or a stats.json) or
    from calibrating on ``data`` (a file, or a list of text files to mix; neither: the built-in
    corpus, :func:`default_calibration_data`). ``sparsity`` re-targets (default: the plan in
    ``stats``; calibrating with neither ``sparsity`` nor ``budget``: calibration.budget.default_target). ``fuse``: targets that drop the same elements of one input
    (gate and up) become one node (scap_onnx.passes.fuse).

    ``budget``: the share of the targets' weight bytes to skip, each input's sparsity allocated from
    the stored error curves (scap_onnx.calibration.budget) instead of a SPEC.

    ``nbits_scales``: "float16" (default) or "float32", the type of the scales of the
    ScapSparseMatMulNBits nodes that replace quantized targets: float16 where every scale of a target
    rounds to within 2^-11 of itself (scap_onnx.op.nbits.block_scales_for_layout), float32 keeps
    them exact.

    ``model`` may be an onnxruntime-genai folder (genai_config.json, the decoder model, tokenizer
    files): ``output`` is then a folder that ``og.Model(output)`` loads as it is (scap_onnx.graph.genai)."""
    model = Path(model)
    output = Path(output)
    folder = open_genai_folder(model) if is_genai_folder(model) else None
    if folder is not None:
        model = folder.model_path
    if same_file(model, output):
        raise ScapError(f"output {output} would overwrite the input model")
    progress = progress or NullProgress()
    check_nbits_scales(nbits_scales)
    if sparsity is not None:
        parse_spec(sparsity)  # fail early on a bad SPEC
    if budget is not None:
        budget = parse_budget(budget)
        if sparsity is not None:
            raise ScapError("give either --budget or --sparsity, not both")
    if data is not None and not isinstance(data, (str, Path)):
        data = list(data) or None  # a list of files; an empty one means no data
    if stats is None and data is None:
        data = default_calibration_data(model, calibrate_kwargs.get("tokenizer"))
    if stats is not None and data is not None:
        raise ScapError("give either --stats or --data, not both")
    if stats is None:
        stats = calibrate(model, data, sparsity=sparsity, targets=targets, progress=progress, budget=budget,
                          **calibrate_kwargs)  # neither SPEC nor budget: the default budget
        fp = stats.model["fingerprint"]
    else:
        if not isinstance(stats, Stats):
            stats = Stats.load(stats)
        fp = model_fingerprint(model)
    stats.check_model(fp, model)
    if budget is not None and stats.calibration.get("budget") != budget:
        stats = apply_budget(Stats.from_dict(stats.to_dict()), budget)  # a copy: the caller's stats stay
    plan = stats.plan(sparsity)
    # --targets, else the calibration's selection (stats of older versions may hold targets that are
    # excluded by default now, such as MoE routers)
    selection = targets if targets is not None else stats.calibration.get("targets")
    chosen = {t.name for t in select_targets(find_all_targets(GraphView.from_proto(load_proto(model))), selection)}
    plan = {k: v for k, v in plan.items() if k in chosen}
    if not plan:
        raise ScapError("nothing to rewrite: the SPEC names no role of the calibrated targets")
    task = progress.task("rewrite", len(plan))
    if folder is None:
        done = rewrite_file(model, output, plan, fuse=fuse, check=check, nbits_scales=nbits_scales)
    else:
        done = _rewrite_folder(folder, output, plan, fuse=fuse, check=check, nbits_scales=nbits_scales)
    task.advance(len(done.rewritten))
    task.close()
    return RewriteResult(done.output, done.external_data, plan, stats, done.rewritten, done.nodes)


def _rewrite_folder(folder: GenaiFolder, output: Path, plan: dict, *, fuse: bool, check: bool,
                    nbits_scales: str) -> Rewritten:
    """The rewritten genai folder ``output``, written atomically, with the op library copied in."""
    try:
        library = get_library_path()
    except FileNotFoundError as e:
        raise ScapError(str(e)) from None
    skip = [folder.model_path] + external_files(load_model(folder.model_path))
    done: list[Rewritten] = []
    write_genai_folder(folder, output, lambda path: done.append(rewrite_file(folder.model_path, path, plan, fuse=fuse,
                                                                             check=check, nbits_scales=nbits_scales)),
                       library, skip)
    return Rewritten(output, None, done[0].rewritten, done[0].nodes)


#: The built-in calibration corpus of `rewrite MODEL` without --data: CPython's documentation,
#: modern technical English (scap_onnx.prepare builds it from Debian's python3-doc and caches it).
DEFAULT_CORPUS = "pydoc"


def default_calibration_data(model: str | Path, tokenizer: str | Path | None = None) -> Path:
    """The text a model is calibrated on when no data is given: the built-in corpus, prepared and
    cached on first use. ScapError for a model without a tokenizer (it needs --data)."""
    if not Path(model).is_file():
        raise ScapError(missing_model_message(model))
    try:
        find_tokenizer(model, tokenizer)
    except ScapError:
        raise ScapError(f"rewrite needs --stats or --data: {Path(model).name} has no tokenizer.json beside it, so the "
                        "built-in text corpus cannot feed it; give --data (an .npz of input feeds, or a text file "
                        "with --tokenizer DIR)") from None
    try:
        return prepare_texts()[DEFAULT_CORPUS]
    except Exception as e:  # preparation needs packages and Debian's archive
        raise ScapError(f"cannot prepare the built-in calibration corpus ({type(e).__name__}: {e}); give --data") from None


def inspect(model: str | Path, targets: str | None = None) -> list[Target]:
    """Target MatMuls of a model (``targets`` patterns as in --targets; all but lm_head and routers by default)."""
    proto = load_proto(resolve_model(model))
    return find_targets(proto, targets)


__all__ += ["find_targets", "group_sites"]
