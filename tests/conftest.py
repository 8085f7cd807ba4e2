"""Shared fixtures: tiny models (built here, fast) and the real prepared models (cached).

Real-model fixtures are session-scoped and run each expensive calibration once. When the prepared
models cannot be had (see scap_onnx.prepare) they fail under CI (environment variable CI set) and
skip with the reason elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from onnx.reference.op_run import OpRun

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402


def reference_op() -> type[OpRun]:
    """ScapSparseMatMul for onnx.reference.ReferenceEvaluator(new_ops=[...])."""
    from scap_onnx.op.reference import ScapSparseMatMulOpRun

    return ScapSparseMatMulOpRun


# ----------------------------------------------------------------------------- CPU caps
def cpu_flags() -> set[str] | None:
    """The CPU's flags from /proc/cpuinfo, or None where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


_AVX512 = {"avx512f", "avx512bw", "avx512vl"}
#: The /proc/cpuinfo flags each SCAP_ONNX_ISA cap needs.
ISA_FLAGS = {"portable": set(), "avx2": {"avx2", "fma", "f16c"}, "avx512": _AVX512,
             "amx": _AVX512 | {"amx_tile", "amx_bf16", "avx512_bf16"}}


def skip_unless_cpu_runs(isa: str, unknown_ok: bool = True) -> None:
    """Skips when the CPU lacks the cap's flags (or they are unknown, unless unknown_ok)."""
    flags = cpu_flags()
    need = ISA_FLAGS[isa]
    if flags is None and not unknown_ok:
        pytest.skip(f"no /proc/cpuinfo: cannot tell whether the CPU runs the {isa} kernels")
    if flags is not None and not need <= flags:
        pytest.skip(f"this CPU lacks {sorted(need - flags)}: the {isa} kernels cannot run here")


def run_cli(*args, check: bool | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real command line (``python -m scap_onnx.cli``, the console script's main())."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "scap_onnx.cli", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO,
    )
    if check is True and proc.returncode != 0:
        raise AssertionError(f"scap-onnx {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny decoder (inline and external-data), encoder, no-target model, texts."""
    root = tmp_path_factory.mktemp("tiny")
    out = {
        "decoder": tiny_models.make_decoder(root / "decoder" / "model.onnx"),
        "decoder_ext": tiny_models.make_decoder(root / "decoder_ext" / "model.onnx", external=True),
        "encoder": tiny_models.make_encoder(root / "encoder" / "model.onnx"),
        "no_targets": tiny_models.make_no_targets(root / "no_targets.onnx"),
    }
    out.update(tiny_models.make_texts(root))
    return out


# ----------------------------------------------------------------------------- real models
def under_ci() -> bool:
    """Whether the tests run under CI (the environment variable CI set, e.g. CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def prepared(fn_name: str):
    """The result of ``scap_onnx.prepare.<fn_name>()``.

    When preparation fails (packages missing, export broken, ...) the test fails under CI, so a
    broken preparation cannot pass CI green; elsewhere it is skipped with the reason.
    """
    try:
        from scap_onnx import prepare

        return getattr(prepare, fn_name)()
    except Exception as e:  # noqa: BLE001 - preparation needs packages that may be missing
        msg = f"{fn_name}() failed: {type(e).__name__}: {e}"
        if under_ci():
            pytest.fail(f"{msg}\n(CI is set: a preparation failure fails the run)\n{traceback.format_exc()}")
        pytest.skip(msg)


@pytest.fixture(scope="session")
def texts() -> dict[str, Path]:
    return prepared("prepare_texts")


@pytest.fixture(scope="session")
def smollm2(texts) -> Path:
    return prepared("prepare_smollm2") / "model.onnx"


@pytest.fixture(scope="session")
def minilm(texts) -> Path:
    return prepared("prepare_minilm") / "model.onnx"


SMOL_SPEC = "up=0.35,gate=0.35,down=0.55"


@pytest.fixture(scope="session")
def smol_stats(smollm2, texts, tmp_path_factory) -> Path:
    """SmolLM2 calibrated once through the CLI on pydoc (small: the acceptance numbers use more), by
    SCAP's search with token-scaled o and down (the default until issue 16): the tests on it check
    non-zero centres, token scaling and targets that hold on another text."""
    out = tmp_path_factory.mktemp("smol") / "stats.json"
    run_cli("calibrate", smollm2, "--data", texts["pydoc"], "--sparsity", SMOL_SPEC, "--tokens", 2048,
            "--seq-len", 128, "--passes", 2, "--method", "scap-search", "-o", out, check=True)
    return out


@pytest.fixture(scope="session")
def minilm_stats(minilm, texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "stats.json"
    run_cli("calibrate", minilm, "--data", texts["pydoc"], "--sparsity", "0.5", "--tokens", 4096,
            "--seq-len", 128, "--passes", 2, "-o", out, check=True)
    return out
