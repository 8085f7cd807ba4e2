"""The ``scap-onnx`` command line (typer): calibrate, rewrite, inspect, validate, sweep, demo.

Bad input exits with code 2 and a one-line reason on stderr; long work shows progress on stderr;
outputs are written atomically; the input model is never modified.

Why this module is long: it is the only module that imports typer, so every command's options
live here, each command a thin layer over the library (scap_onnx.api, scap_onnx.evaluation,
scap_onnx.experiments).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer

from . import api
from .calibration.budget import DEFAULT_BUDGET, default_target, parse_budget, planned_bytes_share
from .calibration.methods import DEFAULT_METHOD, METHODS, get_method
from .calibration.spec import parse_roles, parse_spec
from .calibration.stats import Stats
from .errors import ScapError
from .evaluation.options import ValidateOptions
from .evaluation.report import write_report
from .evaluation.validate import default_report_path, targets_from_spec, validate
from .experiments import demo, sweep, sweep_report
from .graph.fileio import check_output_file, same_file
from .graph.genai import is_genai_folder, resolve_model
from .graph.model_io import load_proto
from .graph.quantized import FLOAT_TYPES, unsupported_weights
from .graph.targets import find_targets, group_sites
from .graph.view import GraphView
from .op.contract import channel_input_names, is_float_node, node_attribute, scap_nodes, targets_of
from .op.nbits import DEFAULT_NBITS_SCALES, NBITS_SCALES, check_nbits_scales
from .progress import make_progress

app = typer.Typer(
    name="scap-onnx",
    help="Post-training activation sparsity (SCAP) for ONNX models: calibrate, rewrite, inspect.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT):
    """Print ``error: message`` (one line) to stderr and exit with ``code``."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """ScapError -> exit 2 with its message; other exceptions -> one line, exit 1 (traceback with SCAP_ONNX_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except ScapError as e:
            fail(str(e))
        except BrokenPipeError:  # output piped into head & co.
            sys.stderr.close()
            raise typer.Exit(0)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except Exception as e:  # never a bare traceback for the user
            if os.environ.get("SCAP_ONNX_DEBUG"):
                raise
            fail(f"unexpected {type(e).__name__}: {e} (set SCAP_ONNX_DEBUG=1 for a traceback)", code=1)

    return wrapper


def _stop(progress) -> None:
    stop = getattr(progress, "stop", None)
    if stop:
        stop()


# Options shared by calibrate and rewrite --data.
DataOpt = typer.Option(None, "--data", "-d", help="Calibration data: a text file (.txt, .jsonl with a 'text' field) or an .npz of input feeds. Repeat it for several text files: their windows are mixed, --tokens split evenly between them.")
TokenizerOpt = typer.Option(None, "--tokenizer", help="Folder with tokenizer.json (default: beside the model).")
TargetsOpt = typer.Option(None, "--targets", help="Comma-separated patterns on node name, weight name or role (e.g. 'down,*mlp*', '!*layers.0/*'); default: every target but lm_head and MoE routers.")
TokensOpt = typer.Option(None, "--tokens", help="Calibration tokens to read (windows of --seq-len; default: the --method's).")
SeqLenOpt = typer.Option(256, "--seq-len", help="Tokens per calibration window.")
BatchOpt = typer.Option(1, "--batch-size", help="Windows per onnxruntime run.")
SamplingOpt = typer.Option("spread", "--sampling", help="Where text windows come from: 'spread' (evenly across the whole file) or 'contiguous' (from its start).")
PassesOpt = typer.Option(None, "--passes", help="1: calibrate on dense activations; each further pass recalibrates with upstream targets sparsified (default: the --method's).")
MethodOpt = typer.Option(None, "--method", help=f"Calibration method: {', '.join(METHODS)} (default {DEFAULT_METHOD}; docs/calibration.md).")
SampleRowsOpt = typer.Option(128, "--sample-rows", help="Activation rows kept per input to score offset candidates by output error.")
ThreadsOpt = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: all cores).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")
BudgetOpt = typer.Option(None, "--budget", help="Share of the targets' weight bytes to skip per token, 0 < B < 1: each "
                         "input's sparsity is allocated from its error curve for the least output error, instead of a "
                         f"SPEC (docs/calibration.md). Calibrating with neither --budget nor --sparsity: "
                         f"{DEFAULT_BUDGET:g}.")
# Options shared by validate, sweep and demo.
KvLenOpt = typer.Option(256, "--kv-len", help="Decode step: tokens already in the KV cache.")
TimingThreadsOpt = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: physical cores).")
ProviderOpt = typer.Option("cpu", "--provider", help="Execution provider: cpu, cuda or a full onnxruntime provider name.")
TokenScaledOpt = typer.Option(None, "--token-scaled",
                              help="Roles whose thresholds scale with each token's norm (their inputs are not "
                                   "normalised), e.g. 'o,down', so that the sparsity holds on other texts; 'none': "
                                   "all static (default: the --method's).")


def _calibrate_kwargs(tokenizer, tokens, seq_len, batch_size, sampling, passes, sample_rows, threads,
                      token_scaled, method) -> dict:
    get_method(method)  # a one-line error now for an unknown method
    return dict(tokenizer=tokenizer, max_tokens=tokens, seq_len=seq_len, batch_size=batch_size, sampling=sampling,
                passes=passes, sample_rows=sample_rows, threads=threads, method=method,
                token_scaled_roles=parse_roles(token_scaled))


def _summary_lines(stats, plan) -> list[str]:
    from collections import defaultdict

    by_role = defaultdict(list)
    for p in plan.values():
        by_role[p.role].append(p)
    lines = []
    for role, ps in by_role.items():
        kinds = defaultdict(int)
        for p in ps:
            kinds[p.offset_kind] += 1
        s = sum(p.sparsity for p in ps) / len(ps)
        kind_txt = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        lines.append(f"  {role:8s} {len(ps):4d} targets  sparsity {s:.3f}  offsets: {kind_txt}")
    return lines


@app.command()
@handle_errors
def calibrate(
    model: Path = typer.Argument(..., help="ONNX model (as optimum exports it, tokenizer.json beside it) or onnxruntime-genai folder."),
    data: Optional[List[Path]] = DataOpt,
    output: Path = typer.Option(..., "--output", "-o", help="stats.json to write."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help=f"SPEC: one number for every target (0.5) or per role (up=0.35,gate=0.35,down=0.55); neither this nor --budget: --budget {DEFAULT_BUDGET:g}."),
    tokenizer: Optional[Path] = TokenizerOpt,
    targets: Optional[str] = TargetsOpt,
    tokens: Optional[int] = TokensOpt,
    seq_len: int = SeqLenOpt,
    batch_size: int = BatchOpt,
    sampling: str = SamplingOpt,
    passes: Optional[int] = PassesOpt,
    sample_rows: int = SampleRowsOpt,
    threads: Optional[int] = ThreadsOpt,
    token_scaled: Optional[str] = TokenScaledOpt,
    method: Optional[str] = MethodOpt,
    budget: Optional[str] = BudgetOpt,
    quiet: bool = QuietOpt,
):
    """Collect activation statistics and choose offsets and thresholds; write stats.json."""
    spec = None if sparsity is None else parse_spec(sparsity)
    budget_share = None if budget is None else parse_budget(budget)
    if spec is not None and budget_share is not None:
        fail("give either --budget or --sparsity, not both")
    if not data:
        fail("calibrate needs --data DATA (a text file or an .npz of feeds)")
    if same_file(output, model):
        fail(f"output {output} would overwrite the input model")
    check_output_file(output)
    progress = make_progress(quiet)
    try:
        stats = api.calibrate(model, data, sparsity=spec, targets=targets, progress=progress, budget=budget_share,
                    **_calibrate_kwargs(tokenizer, tokens, seq_len, batch_size, sampling, passes, sample_rows, threads,
                                        token_scaled, method))
    finally:
        _stop(progress)
    stats.save(output)
    cal = stats.calibration
    typer.echo(f"calibrated {stats.model['targets']} targets ({stats.model['sites']} inputs) on {cal['tokens']} tokens, "
               f"{cal['passes']} pass(es), {cal['seconds']:.0f}s -> {output}")
    if "budget" in cal:
        dense = sum(1 for s in stats.sites if s.sparsity is None)
        mix = cal.get("budget_check", {}).get("mix")
        kept = "" if mix is None else (", the uniform plan kept by the check" if mix == 0 else
                                       f", {mix:g} of the way from the uniform plan, as the check kept")
        typer.echo(f"budget {cal['budget']:g}: each input's sparsity allocated from its error curve and gain{kept} "
                   f"({planned_bytes_share(stats):.3f} of the targets' weight bytes skipped on the calibration data; "
                   f"{dense} inputs left dense)")
    for line in _summary_lines(stats, stats.plan()):
        typer.echo(line)


@app.command()
@handle_errors
def rewrite(
    model: Path = typer.Argument(..., help="ONNX model or onnxruntime-genai folder to rewrite (never modified)."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="stats.json from `scap-onnx calibrate`."),
    data: Optional[List[Path]] = DataOpt,
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help="SPEC to re-target (default: the plan in --stats; calibrating, --budget "
                                                   f"{DEFAULT_BUDGET:g})."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output model (default: MODEL_scap.onnx beside MODEL); for a genai folder, the output folder (default: FOLDER_scap)."),
    targets: Optional[str] = TargetsOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
    tokens: Optional[int] = TokensOpt,
    seq_len: int = SeqLenOpt,
    batch_size: int = BatchOpt,
    sampling: str = SamplingOpt,
    passes: Optional[int] = PassesOpt,
    sample_rows: int = SampleRowsOpt,
    threads: Optional[int] = ThreadsOpt,
    token_scaled: Optional[str] = TokenScaledOpt,
    method: Optional[str] = MethodOpt,
    budget: Optional[str] = BudgetOpt,
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="With --data: also write the stats.json."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run onnx.checker on the result."),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse",
                              help="One node for targets that drop the same elements of one input (gate and up)."),
    nbits_scales: str = typer.Option(DEFAULT_NBITS_SCALES, "--nbits-scales",
                                     help=f"Quantized targets: the type of the new nodes' block scales, "
                                          f"{' or '.join(NBITS_SCALES)}. float16: each scale rounded to 11 "
                                          "significant bits (relative error at most 2^-11) where all of a "
                                          "target's lie in float16's normal range, fewer bytes read per kept "
                                          "block; float32: exactly the source's (float16 ones stay float16)."),
    quiet: bool = QuietOpt,
):
    """Replace target MatMuls by ScapSparseMatMul with calibrated thresholds and offsets."""
    check_nbits_scales(nbits_scales)
    if sparsity is not None:
        parse_spec(sparsity)
    budget_share = None if budget is None else parse_budget(budget)
    folder = is_genai_folder(model)
    if output is None:
        output = model.with_name(model.name + "_scap") if folder else model.with_name(model.stem + "_scap.onnx")
    for path in (None if folder else output, save_stats):
        if path is not None:
            check_output_file(path)
    kwargs = {}
    data = data or None
    if data is None and stats is None:
        data = api.default_calibration_data(resolve_model(model), tokenizer)
        spec_asked, budget_asked = default_target(sparsity, budget_share, get_method(method).weighted)
        typer.echo(f"rewrite: no --stats or --data: calibrating on the built-in corpus {data} "
                   f"({tokens or get_method(method).max_tokens} tokens, method {get_method(method).name}, "
                   + (f"SPEC {spec_asked})" if spec_asked is not None else f"budget {budget_asked:g})"), err=True)
    if data is not None:
        kwargs = _calibrate_kwargs(tokenizer, tokens, seq_len, batch_size, sampling, passes, sample_rows, threads,
                                   token_scaled, method)
    progress = make_progress(quiet)
    try:
        result = api.rewrite(model, output, stats=stats, data=data, sparsity=sparsity, targets=targets, check=check,
                     fuse=fuse, progress=progress, budget=budget_share, nbits_scales=nbits_scales, **kwargs)
    finally:
        _stop(progress)
    if save_stats is not None:
        result.stats.save(save_stats)
    extra = f" (+ {result.external_data.name})" if result.external_data else ""
    fused = f" in {result.nodes} nodes" if result.nodes != len(result.rewritten) else ""
    typer.echo(f"rewrote {len(result.rewritten)} targets{fused} -> {output}{extra}")
    for line in _summary_lines(result.stats, result.plan):
        typer.echo(line)


def _nbits_scales_summary(rewritten: list[dict]) -> str:
    """'; NBits scales float16' (each type with its count where they mix), '' without NBits nodes."""
    types = Counter(r["scales"] for r in rewritten if r.get("scales"))
    if len(types) < 2:
        return "".join(f"; NBits scales {t}" for t in types)
    return "; NBits scales " + ", ".join(f"{t} ({c})" for t, c in types.items())


@app.command()
@handle_errors
def inspect(
    model: Path = typer.Argument(..., help="ONNX model or onnxruntime-genai folder."),
    targets: Optional[str] = TargetsOpt,
    stats: Optional[Path] = typer.Option(None, "--stats", help="Also show offset and threshold from this stats.json."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help="With --stats: SPEC to show thresholds for."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List target MatMuls: role, layer, K, N, weight format, bias, and which share an input; and
    quantized MatMuls that stay dense, with why."""
    model = resolve_model(model)
    proto = load_proto(model)
    existing = scap_nodes(proto)
    elem_of = {t.name: t.data_type for t in proto.graph.initializer}  # a ScapSparseMatMulNBits' scales' type
    dense = [{"op": op, "name": name, "why": why} for op, name, why in unsupported_weights(GraphView.from_proto(proto))]
    try:
        found = find_targets(proto, targets)
    except ScapError:
        if existing and targets is None:
            found = []
        else:
            raise
    plan = {}
    if stats is not None:
        st = Stats.load(stats)
        del proto
        st.check_model(api.model_fingerprint(model), model)
        plan = st.plan(sparsity)
    sites = group_sites(found)
    site_of = {}
    for i, s in enumerate(sites):
        for t in s.targets:
            site_of[t.name] = (i, s)
    rows = []
    for t in found:
        i, s = site_of[t.name]
        row = {"name": t.name, "role": t.role, "layer": t.layer, "k": t.k, "n": t.n, "dtype": t.dtype,
               "format": t.weight_format, "bias": t.bias is not None, "input": t.input, "site": i,
               "shared_with": [x.name for x in s.targets if x.name != t.name]}
        if t.name in plan:
            p = plan[t.name]
            row.update(sparsity=p.sparsity, offset=p.offset, offset_kind=p.offset_kind, threshold=p.threshold)
        rows.append(row)
    rewritten = [{"name": n.name, "op": n.op_type, "targets": targets_of(n) or [n.name],
                  "threshold": node_attribute(n, "threshold"), "offset": node_attribute(n, "offset"),
                  **{k: v is not None for k, v in zip(("threshold_scale", "channel_offset"), channel_input_names(n))},
                  **({} if is_float_node(n) else {"scales": FLOAT_TYPES.get(elem_of.get(n.input[2]))})}
                 for n in existing]
    if as_json:
        typer.echo(json.dumps({"targets": rows, "scap_nodes": rewritten, "stay_dense": dense}, indent=1))
        return
    if rows:
        typer.echo(f"{len(rows)} targets, {len(sites)} distinct inputs")
        width = max(len("format"), *(len(r["format"]) for r in rows))
        head = f"{'layer':>5} {'role':7} {'K':>6} {'N':>6} {'format':{width}} bias {'input':>6}  name"
        if plan:
            head += "   [sparsity offset(kind) threshold]"
        typer.echo(head)
        for r in rows:
            shared = f"#{r['site']}" + ("*" if r["shared_with"] else "")
            line = (f"{'' if r['layer'] is None else r['layer']:>5} {r['role']:7} {r['k']:>6} {r['n']:>6} "
                    f"{r['format']:{width}} {'yes' if r['bias'] else 'no':4} {shared:>6}  {r['name']}")
            if "threshold" in r:
                line += f"   [{r['sparsity']:.3f} {r['offset']:+.4g}({r['offset_kind']}) {r['threshold']:.4g}]"
            typer.echo(line)
        typer.echo("(#N: input tensor; * shared by several targets: one offset, and one threshold where their roles have one sparsity)")
    if rewritten:
        computed = sum(len(r["targets"]) for r in rewritten)
        ops = " + ".join(f"{c} {op}" for op, c in Counter(r["op"] for r in rewritten).items())
        typer.echo(f"{ops} nodes already in the model, computing {computed} targets{_nbits_scales_summary(rewritten)}")
    for d in dense:  # quantized weights of a form the NBits op cannot take
        typer.echo(f"stays dense: {d['op']} {d['name']!r} {d['why']}")


@app.command("validate")
@handle_errors
def validate_command(
    dense: Path = typer.Argument(..., help="The original (dense) ONNX model or onnxruntime-genai folder."),
    sparse: Path = typer.Argument(..., help="The rewritten model (or genai folder) with ScapSparseMatMul nodes."),
    data: Path = typer.Option(..., "--data", "-d", help="Held-out data: a text file (.txt, .jsonl) or an .npz of input feeds."),
    report: Optional[Path] = typer.Option(None, "--report", "-r", help="Report JSON (default: SPARSE.report.json beside SPARSE); .md and .png files are written beside it."),
    tokenizer: Optional[Path] = TokenizerOpt,
    tokens: int = typer.Option(4096, "--tokens", help="Evaluation tokens (windows of --seq-len)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per evaluation window."),
    sampling: str = typer.Option("spread", "--sampling", help="Text windows: 'spread' (evenly across the whole file) or 'contiguous' (from its start)."),
    phase: float = typer.Option(0.0, "--phase", help="Spread sampling: shift of the window places in [0, 1); 0.5 gives windows disjoint from a calibration at 0 (held out from the same file)."),
    skip_tokens: int = typer.Option(0, "--skip-tokens", help="Skip this many tokens first (implies contiguous windows)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per onnxruntime run."),
    kv_len: int = KvLenOpt,
    repeats: int = typer.Option(20, "--repeats", help="Timed rounds (dense and sparse once each per round)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed rounds first."),
    prefill_repeats: int = typer.Option(5, "--prefill-repeats", help="Timed rounds of the prefill."),
    threads: Optional[int] = TimingThreadsOpt,
    provider: str = ProviderOpt,
    thread_pool: str = typer.Option("shared", "--thread-pool", help="Latency: 'shared' (dense and sparse sessions on one onnxruntime thread pool that spins, like one session with onnxruntime's defaults) or 'separate' (a pool each)."),
    spinning: bool = typer.Option(False, "--spinning/--no-spinning", help="With --thread-pool separate: the pools' threads spin (off by default: two spinning pools steal each other's cores)."),
    accuracy: bool = typer.Option(True, "--accuracy/--no-accuracy", help="Measure accuracy and sparsity."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure latency."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help="SPEC the model was rewritten for (shown next to the measured sparsity)."),
    quiet: bool = QuietOpt,
):
    """Compare SPARSE with DENSE: accuracy (perplexity, agreement, KL or embedding cosine), measured sparsity, decode / prefill / batch latency (interleaved); JSON, markdown and PNG reports."""
    opts = ValidateOptions(tokenizer=tokenizer, seq_len=seq_len, max_tokens=tokens, skip_tokens=skip_tokens,
                           sampling=sampling, phase=phase,
                           batch_size=batch_size, threads=threads, provider=provider, accuracy=accuracy,
                           latency=latency, kv_len=kv_len, warmup=warmup, repeats=repeats,
                           prefill_repeats=prefill_repeats, thread_pool=thread_pool, spinning=spinning, targets=targets_from_spec(sparsity))
    report_path = report or default_report_path(sparse)
    check_output_file(report_path)
    progress = make_progress(quiet)
    try:
        rep = validate(dense, sparse, data, opts, progress=progress)
    finally:
        _stop(progress)
    files = write_report(rep, report_path)
    typer.echo(files["markdown_text"])
    typer.echo(f"report: {files['json']} (+ {files['markdown'].name}"
               + "".join(f", {p.name}" for p in files["plots"]) + ")")


@app.command("sweep")
@handle_errors
def sweep_command(
    model: Path = typer.Argument(..., help="The dense ONNX model (never modified)."),
    data: Path = typer.Option(..., "--data", "-d", help="Calibration data: a text file or an .npz of feeds."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Evaluation data (default: windows of --data half-way between the calibration windows)."),
    output: Path = typer.Option(Path("scap-sweep"), "--output", "-o", help="Output folder (sweep.json, sweep.md, pareto.png, reports/)."),
    levels: str = typer.Option(",".join(f"{v:g}" for v in sweep.DEFAULT_LEVELS), "--levels", help="Comma-separated sparsity levels."),
    methods: str = typer.Option(",".join(sweep.DEFAULT_METHODS), "--methods", help=f"Comma-separated methods: {', '.join(sweep.METHODS)}."),
    tokenizer: Optional[Path] = TokenizerOpt,
    tokens: int = typer.Option(8192, "--tokens", help="Calibration tokens."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per calibration and evaluation window."),
    passes: int = typer.Option(2, "--passes", help="Calibration passes of the SCAP statistics (1: dense activations)."),
    eval_tokens: int = typer.Option(2048, "--eval-tokens", help="Evaluation tokens per point."),
    kv_len: int = KvLenOpt,
    repeats: int = typer.Option(10, "--repeats", help="Timed rounds per point."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed rounds per point."),
    threads: Optional[int] = TimingThreadsOpt,
    provider: str = ProviderOpt,
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure the speedup of every point."),
    keep_models: bool = typer.Option(False, "--keep-models", help="Keep the rewritten models in OUTPUT/models."),
    quiet: bool = QuietOpt,
):
    """Calibrate once, rewrite at several sparsity levels (TEAL-style baseline and SCAP variants), validate each, draw the quality / sparsity / speed Pareto chart."""
    vopts = ValidateOptions(tokenizer=tokenizer, seq_len=seq_len, max_tokens=eval_tokens, threads=threads,
                            provider=provider, kv_len=kv_len, repeats=repeats, warmup=warmup, prefill=False,
                            latency=latency)
    vopts.check()
    progress = make_progress(quiet)
    try:
        res = sweep.sweep(model, data, output, eval_data=eval_data, levels=levels, methods=methods, tokenizer=tokenizer,
                    tokens=tokens, seq_len=seq_len, passes=passes, validate_options=vopts, keep_models=keep_models,
                    progress=progress, log=(lambda m: None) if quiet else (lambda m: typer.echo(m, err=True)))
    finally:
        _stop(progress)
    typer.echo(sweep_report.sweep_markdown(res))
    typer.echo(f"sweep: {output / 'sweep.json'} (+ sweep.md, pareto.png, reports/)")


@app.command("demo")
@handle_errors
def demo_command(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default: ~/.cache/scap-onnx/demo)."),
    sparsity: str = typer.Option(demo.DEFAULT_SPEC, "--sparsity", "-s", help="SPEC to rewrite at."),
    tokens: int = typer.Option(16384, "--tokens", help="Calibration tokens (Python documentation)."),
    eval_text: str = typer.Option("fortunes", "--eval-text",
                                  help="fortunes or kjv (other texts than the calibration's) or pydoc (its held-out part)."),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Evaluation tokens."),
    kv_len: int = KvLenOpt,
    repeats: int = typer.Option(20, "--repeats", help="Timed decode rounds (dense and sparse interleaved)."),
    threads: Optional[int] = TimingThreadsOpt,
    recalibrate: bool = typer.Option(False, "--recalibrate", help="Calibrate again even if matching statistics exist."),
    int4: bool = typer.Option(False, "--int4", help="SmolLM2 built int4 by onnxruntime-genai's model builder: the genai folder rewritten, decode also through og.Generator (default output ~/.cache/scap-onnx/demo-int4)."),
    quiet: bool = QuietOpt,
):
    """The embedded default end to end: prepare SmolLM2-135M, calibrate, rewrite (up=0.35,gate=0.35,down=0.55), validate; prints perplexity, decode tokens/s and speedup."""
    t0 = time.perf_counter()
    progress = make_progress(quiet)
    try:
        res = demo.run_demo(output, sparsity=sparsity, tokens=tokens, eval_text=eval_text, eval_tokens=eval_tokens,
                       kv_len=kv_len, repeats=repeats, threads=threads, recalibrate=recalibrate, int4=int4,
                       progress=progress,
                       log=(lambda m: None) if quiet else (lambda m: typer.echo(m, err=True)))
    finally:
        _stop(progress)
    typer.echo(res["files"]["markdown_text"])
    for line in demo.summary_lines(res["report"]):
        typer.echo(line)
    files = res["files"]
    typer.echo(f"report: {files['json']} (+ {files['markdown'].name}" + "".join(f", {p.name}" for p in files["plots"])
               + f"); sparse {'folder' if int4 else 'model'}: {res['sparse']}; {time.perf_counter() - t0:.0f}s in all")


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``scap-onnx``)."""
    app(args=argv, prog_name="scap-onnx")


if __name__ == "__main__":  # python -m scap_onnx.cli
    main(sys.argv[1:])
