"""The ``scap-onnx`` command line (typer): calibrate, rewrite, inspect.

Bad input exits with code 2 and a one-line reason on stderr; long work shows progress on stderr;
outputs are written atomically; the input model is never modified. More commands (validate,
sweep, demo) register on the same ``app``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import ScapError

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


def _progress(quiet: bool):
    from .progress import make_progress

    return make_progress(quiet)


def _stop(progress) -> None:
    stop = getattr(progress, "stop", None)
    if stop:
        stop()


# Options shared by calibrate and rewrite --data.
DataOpt = typer.Option(None, "--data", "-d", help="Calibration data: a text file (.txt, .jsonl with a 'text' field) or an .npz of input feeds. Repeat it for several text files: their windows are mixed, --tokens split evenly between them.")
TokenizerOpt = typer.Option(None, "--tokenizer", help="Folder with tokenizer.json (default: beside the model).")
TargetsOpt = typer.Option(None, "--targets", help="Comma-separated patterns on node name, weight name or role (e.g. 'down,*mlp*', '!*layers.0/*'); default: every target but lm_head and MoE routers.")
TokensOpt = typer.Option(16384, "--tokens", help="Calibration tokens to read (windows of --seq-len).")
SeqLenOpt = typer.Option(256, "--seq-len", help="Tokens per calibration window.")
BatchOpt = typer.Option(1, "--batch-size", help="Windows per onnxruntime run.")
SamplingOpt = typer.Option("spread", "--sampling", help="Where text windows come from: 'spread' (evenly across the whole file) or 'contiguous' (from its start).")
PassesOpt = typer.Option(2, "--passes", help="1: calibrate on dense activations; each further pass recalibrates with upstream targets sparsified.")
SampleRowsOpt = typer.Option(128, "--sample-rows", help="Activation rows kept per input to score offset candidates by output error.")
ThreadsOpt = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: all cores).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")
TokenScaledOpt = typer.Option("o,down", "--token-scaled",
                              help="Roles whose thresholds scale with each token's norm (their inputs are not "
                                   "normalised), so that the sparsity holds on other texts; 'none': all static.")


def _calibrate_kwargs(tokenizer, tokens, seq_len, batch_size, sampling, passes, sample_rows, threads,
                      token_scaled) -> dict:
    from .token_scale import parse_roles

    return dict(tokenizer=tokenizer, max_tokens=tokens, seq_len=seq_len, batch_size=batch_size, sampling=sampling,
                passes=passes, sample_rows=sample_rows, threads=threads, token_scaled_roles=parse_roles(token_scaled))


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
    model: Path = typer.Argument(..., help="ONNX model (as optimum exports it, tokenizer.json beside it)."),
    data: Optional[List[Path]] = DataOpt,
    output: Path = typer.Option(..., "--output", "-o", help="stats.json to write."),
    sparsity: str = typer.Option("0.5", "--sparsity", "-s", help="SPEC: one number for every target (0.5) or per role (up=0.35,gate=0.35,down=0.55)."),
    tokenizer: Optional[Path] = TokenizerOpt,
    targets: Optional[str] = TargetsOpt,
    tokens: int = TokensOpt,
    seq_len: int = SeqLenOpt,
    batch_size: int = BatchOpt,
    sampling: str = SamplingOpt,
    passes: int = PassesOpt,
    sample_rows: int = SampleRowsOpt,
    threads: Optional[int] = ThreadsOpt,
    token_scaled: str = TokenScaledOpt,
    quiet: bool = QuietOpt,
):
    """Collect activation statistics and choose offsets and thresholds; write stats.json."""
    from .calibrate import calibrate as run
    from .fileio import check_output_file, same_file
    from .spec import parse_spec

    spec = parse_spec(sparsity)
    if not data:
        fail("calibrate needs --data DATA (a text file or an .npz of feeds)")
    if same_file(output, model):
        fail(f"output {output} would overwrite the input model")
    check_output_file(output)
    progress = _progress(quiet)
    try:
        stats = run(model, data, sparsity=spec, targets=targets, progress=progress,
                    **_calibrate_kwargs(tokenizer, tokens, seq_len, batch_size, sampling, passes, sample_rows, threads,
                                        token_scaled))
    finally:
        _stop(progress)
    stats.save(output)
    cal = stats.calibration
    typer.echo(f"calibrated {stats.model['targets']} targets ({stats.model['sites']} inputs) on {cal['tokens']} tokens, "
               f"{cal['passes']} pass(es), {cal['seconds']:.0f}s -> {output}")
    for line in _summary_lines(stats, stats.plan()):
        typer.echo(line)


@app.command()
@handle_errors
def rewrite(
    model: Path = typer.Argument(..., help="ONNX model to rewrite (never modified)."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="stats.json from `scap-onnx calibrate`."),
    data: Optional[List[Path]] = DataOpt,
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help="SPEC to re-target (default: the calibration SPEC)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output model (default: MODEL_scap.onnx beside MODEL)."),
    targets: Optional[str] = TargetsOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
    tokens: int = TokensOpt,
    seq_len: int = SeqLenOpt,
    batch_size: int = BatchOpt,
    sampling: str = SamplingOpt,
    passes: int = PassesOpt,
    sample_rows: int = SampleRowsOpt,
    threads: Optional[int] = ThreadsOpt,
    token_scaled: str = TokenScaledOpt,
    save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="With --data: also write the stats.json."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run onnx.checker on the result."),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse",
                              help="One node for targets that drop the same elements of one input (gate and up)."),
    quiet: bool = QuietOpt,
):
    """Replace target MatMuls by ScapSparseMatMul with calibrated thresholds and offsets."""
    from .api import rewrite as run
    from .fileio import check_output_file
    from .spec import parse_spec

    if sparsity is not None:
        parse_spec(sparsity)
    if output is None:
        output = model.with_name(model.stem + "_scap.onnx")
    for path in (output, save_stats):
        if path is not None:
            check_output_file(path)
    kwargs = {}
    data = data or None
    if data is not None:
        kwargs = _calibrate_kwargs(tokenizer, tokens, seq_len, batch_size, sampling, passes, sample_rows, threads,
                                   token_scaled)
    progress = _progress(quiet)
    try:
        result = run(model, output, stats=stats, data=data, sparsity=sparsity, targets=targets, check=check,
                     fuse=fuse, progress=progress, **kwargs)
    finally:
        _stop(progress)
    if save_stats is not None:
        result.stats.save(save_stats)
    extra = f" (+ {result.external_data.name})" if result.external_data else ""
    fused = f" in {result.nodes} nodes" if result.nodes != len(result.rewritten) else ""
    typer.echo(f"rewrote {len(result.rewritten)} targets{fused} -> {output}{extra}")
    for line in _summary_lines(result.stats, result.plan):
        typer.echo(line)


@app.command()
@handle_errors
def inspect(
    model: Path = typer.Argument(..., help="ONNX model."),
    targets: Optional[str] = TargetsOpt,
    stats: Optional[Path] = typer.Option(None, "--stats", help="Also show offset and threshold from this stats.json."),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s", help="With --stats: SPEC to show thresholds for."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List target MatMuls: role, layer, K, N, bias, and which share an input."""
    from .api import model_fingerprint
    from .capture import load_proto
    from .fuse import members_of
    from .measure import _attr, scap_nodes
    from .stats import Stats
    from .targets import find_targets, group_sites

    proto = load_proto(model)
    existing = scap_nodes(proto)
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
        st.check_model(model_fingerprint(model), model)
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
               "bias": t.bias is not None, "input": t.input, "site": i,
               "shared_with": [x.name for x in s.targets if x.name != t.name]}
        if t.name in plan:
            p = plan[t.name]
            row.update(sparsity=p.sparsity, offset=p.offset, offset_kind=p.offset_kind, threshold=p.threshold)
        rows.append(row)
    rewritten = [{"name": n.name, "targets": members_of(n), "threshold": _attr(n, "threshold"),
                  "offset": _attr(n, "offset")} for n in existing]
    if as_json:
        typer.echo(json.dumps({"targets": rows, "scap_nodes": rewritten}, indent=1))
        return
    if rows:
        typer.echo(f"{len(rows)} targets, {len(sites)} distinct inputs")
        head = f"{'layer':>5} {'role':7} {'K':>6} {'N':>6} bias {'input':>6}  name"
        if plan:
            head += "   [sparsity offset(kind) threshold]"
        typer.echo(head)
        for r in rows:
            shared = f"#{r['site']}" + ("*" if r["shared_with"] else "")
            line = (f"{'' if r['layer'] is None else r['layer']:>5} {r['role']:7} {r['k']:>6} {r['n']:>6} "
                    f"{'yes' if r['bias'] else 'no':4} {shared:>6}  {r['name']}")
            if "threshold" in r:
                line += f"   [{r['sparsity']:.3f} {r['offset']:+.4g}({r['offset_kind']}) {r['threshold']:.4g}]"
            typer.echo(line)
        typer.echo("(#N: input tensor; * shared by several targets: one offset, and one threshold where their roles have one sparsity)")
    if rewritten:
        computed = sum(len(r["targets"]) for r in rewritten)
        typer.echo(f"{len(rewritten)} ScapSparseMatMul nodes already in the model, computing {computed} targets")


# Commands of the validation stage (issue 4), defined in their own modules.
from .validate import validate_command  # noqa: E402
from .sweep import sweep_command  # noqa: E402
from .demo import demo_command  # noqa: E402

app.command("validate")(validate_command)
app.command("sweep")(sweep_command)
app.command("demo")(demo_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``scap-onnx``)."""
    app(args=argv, prog_name="scap-onnx")


if __name__ == "__main__":  # python -m scap_onnx.cli
    main(sys.argv[1:])
