"""Tests of the real prepared models and texts (scap_onnx.prepare), of its cache protocol and of
the package's shape.

The first run builds the artifacts (a few minutes, cached under $SCAP_ONNX_CACHE or
~/.cache/scap-onnx); later runs reuse them.

Over 400 lines: one file for everything scap_onnx.prepare does; its sections (cache layout, the
build protocol on a temporary cache, the package's shape, SmolLM2, MiniLM, texts, conftest's
preparation helper) are independent and could become separate files."""

from __future__ import annotations

import ast
import collections
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from scap_onnx.prepare import (
    PREP_FORMAT,
    cache_dir,
    cached_build,
    fortunes_to_prose,
    is_complete,
    prepare_minilm,
    prepare_smollm2,
    prepare_texts,
    rst_to_prose,
)
from scap_onnx.prepare.cache import file_lock, lock_path

PREPARE_DIR = Path(__file__).resolve().parents[1] / "scap_onnx" / "prepare"

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NUM_LAYERS = 30


@pytest.fixture(scope="module")
def texts() -> dict[str, Path]:
    return prepare_texts()


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return prepare_smollm2()


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return prepare_minilm()


@pytest.fixture(scope="module")
def smollm2_session(smollm2_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(smollm2_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def _pydoc_sentence(path: Path, min_words: int = 25) -> str:
    with open(path, encoding="utf-8") as fh:
        for para in fh:
            words = para.split()
            if len(words) >= min_words and para[0].isupper():
                return " ".join(words[:60])
    raise AssertionError("no prose paragraph in pydoc.txt")


# ---- cache layout


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SCAP_ONNX_CACHE", str(tmp_path / "c"))
    assert cache_dir() == (tmp_path / "c").resolve()
    monkeypatch.delenv("SCAP_ONNX_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "scap-onnx"


def test_artifacts_live_outside_repo_and_are_marked(texts, smollm2_dir, minilm_dir):
    repo = Path(__file__).resolve().parent.parent
    for p in (smollm2_dir, minilm_dir, *texts.values()):
        assert repo not in p.resolve().parents
        assert cache_dir().resolve() in p.resolve().parents
    for folder in (smollm2_dir, minilm_dir, texts["kjv"].parent):
        marker = json.loads((folder / ".complete").read_text())
        assert marker["format"] >= 1
        assert "versions" in marker
    assert json.loads((smollm2_dir / ".complete").read_text())["check"]["cached_step"]["ok"]


def _file_ids(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file in ``folder``: a rebuild renames a new folder into place,
    so it changes every inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def test_prepare_does_not_rebuild_when_cached(texts, smollm2_dir, minilm_dir):
    folders = (smollm2_dir, minilm_dir, texts["kjv"].parent)
    before = {f: _file_ids(f) for f in folders}
    assert all(".complete" in ids and len(ids) > 1 for ids in before.values())
    assert prepare_smollm2() == smollm2_dir
    assert prepare_minilm() == minilm_dir
    assert prepare_texts() == texts
    assert {f: _file_ids(f) for f in folders} == before


# ---- the cache's build protocol (cached_build), on a temporary cache


@pytest.fixture
def tmp_cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("SCAP_ONNX_CACHE", str(tmp_path / "cache"))
    return cache_dir()


def _writer(calls: list, text: str = "x", subdir: str = "out"):
    def build(tmp: Path):
        calls.append(tmp)
        out = tmp / subdir
        out.mkdir()
        (out / "a.txt").write_text(text)
        return out, {"what": "test", "text": text}

    return build


def test_cached_build_builds_once(tmp_cache):
    final = tmp_cache / "models" / "thing"
    calls: list[Path] = []
    assert cached_build(final, ("a.txt",), _writer(calls)) == final
    assert len(calls) == 1 and calls[0].parent == final.parent
    assert calls[0].name.startswith(".thing.tmp-")
    assert (final / "a.txt").read_text() == "x"
    marker = json.loads((final / ".complete").read_text())
    assert marker["format"] == PREP_FORMAT and marker["what"] == "test" and "build_seconds" in marker
    assert is_complete(final, ("a.txt",))
    ids = _file_ids(final)
    assert cached_build(final, ("a.txt",), _writer(calls)) == final
    assert len(calls) == 1 and _file_ids(final) == ids  # not called again, nothing rewritten
    assert sorted(p.name for p in final.parent.iterdir()) == ["thing"]  # no temporary folders


def test_cached_build_rebuilds_when_forced_rejected_or_incomplete(tmp_cache):
    final = tmp_cache / "thing"
    calls: list[Path] = []
    cached_build(final, ("a.txt",), _writer(calls, "1"))
    cached_build(final, ("a.txt",), _writer(calls, "2"), force=True)
    assert len(calls) == 2 and (final / "a.txt").read_text() == "2"
    cached_build(final, ("a.txt",), _writer(calls, "3"), accept=lambda m: m["text"] == "3")
    assert len(calls) == 3 and (final / "a.txt").read_text() == "3"
    cached_build(final, ("a.txt",), _writer(calls, "4"), accept=lambda m: m["text"] == "3")
    assert len(calls) == 3
    (final / ".complete").write_text(json.dumps({"format": PREP_FORMAT - 1}))  # an older format
    cached_build(final, ("a.txt",), _writer(calls, "5", subdir="o"))
    assert len(calls) == 4 and (final / "a.txt").read_text() == "5"
    assert sorted(p.name for p in final.parent.iterdir() if p.name != ".thing.lock") == ["thing"]


def test_cached_build_failure_leaves_nothing(tmp_cache):
    final = tmp_cache / "thing"

    def broken(tmp: Path):
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("build broke")

    with pytest.raises(RuntimeError, match="build broke"):
        cached_build(final, ("a.txt",), broken)
    with pytest.raises(RuntimeError, match="left no .*b.txt"):
        cached_build(final, ("a.txt", "b.txt"), _writer([]))
    assert [p.name for p in final.parent.iterdir()] == [".thing.lock"]


def test_cached_build_removes_leftovers_of_a_killed_build(tmp_cache):
    final = tmp_cache / "thing"
    cached_build(final, ("a.txt",), _writer([]))
    (final.parent / ".thing.tmp-killed").mkdir()
    (final.parent / ".thing.old-123").mkdir()
    cached_build(final, ("a.txt",), _writer([]))  # cached: tidies while nobody builds
    assert sorted(p.name for p in final.parent.iterdir()) == [".thing.lock", "thing"]


def test_file_lock_is_exclusive(tmp_cache):
    path = lock_path("thing")
    with file_lock(path) as held:
        assert held
        with file_lock(path, wait=False) as again:  # another open of the file: refused
            assert not again
    with file_lock(path, wait=False) as held:
        assert held


# ---- the package's shape


def _module_level_imports(tree: ast.Module) -> list[tuple[int, str, int]]:
    """(line, module, level) of the imports outside functions and classes."""
    out = []
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or "", node.level))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            stack.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)
    return out


#: The modules of scap_onnx.prepare; each imports only modules before it.
ORDER = ("cache", "export", "models", "genai", "prose", "texts", "__init__")


def test_prepare_package_is_portable_and_a_leaf():
    modules = sorted(PREPARE_DIR.glob("*.py"))
    assert {m.stem for m in modules} == set(ORDER)
    for m in modules:
        text = m.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 400, m.name
        tree = ast.parse(text)
        for line, name, level in _module_level_imports(tree):
            top = name.split(".")[0]
            assert top not in {"fcntl", "msvcrt", "termios", "pwd", "grp", "resource"}, (m.name, line)
            assert level > 0 or top != "scap_onnx", (m.name, line)  # nothing else from scap_onnx
            assert level <= 1, (m.name, line)
            if level == 1:
                assert name in ORDER[: ORDER.index(m.stem)], (m.name, line, name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("scap_onnx"), (m.name, node.lineno)


# ---- SmolLM2


def test_smollm2_folder_has_model_and_tokenizer(smollm2_dir):
    for name in ("model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (smollm2_dir / name).is_file(), name
    size = sum(p.stat().st_size for p in smollm2_dir.iterdir() if p.name.startswith("model.onnx"))
    assert 450e6 < size < 650e6  # 135M float32 parameters


def test_smollm2_projection_matmuls(smollm2_dir):
    model = onnx.load(str(smollm2_dir / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    targets = [
        n for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]
    assert len(targets) == len(ROLES) * NUM_LAYERS == 210
    per_role: collections.Counter[str] = collections.Counter()
    layers = set()
    for n in targets:
        roles = [r for r in ROLES if f"/{r}/" in n.name]
        assert len(roles) == 1, n.name
        role = roles[0]
        assert role in n.input[1], (n.name, n.input[1])
        m = re.search(r"layers\.(\d+)", n.name)
        assert m and m.group(1) in n.input[1]
        per_role[role] += 1
        layers.add(int(m.group(1)))
        k, nn = inits[n.input[1]].dims
        if role == "down_proj":
            assert (k, nn) == (1536, 576)
        else:
            assert k == 576
    assert per_role == {r: NUM_LAYERS for r in ROLES}
    assert layers == set(range(NUM_LAYERS))


def test_smollm2_inputs(smollm2_session):
    names = [i.name for i in smollm2_session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    past = [n for n in names if n.startswith("past_key_values.")]
    assert len(past) == 2 * NUM_LAYERS
    assert "logits" in [o.name for o in smollm2_session.get_outputs()]


def test_smollm2_runs_on_pydoc_text(smollm2_dir, smollm2_session, texts):
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    sentence = _pydoc_sentence(texts["pydoc"])
    ids = tok.encode(sentence, add_special_tokens=False).ids
    assert 10 < len(ids) < 200
    seq = len(ids)
    feeds = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, seq), dtype=np.int64),
        "position_ids": np.arange(seq, dtype=np.int64)[None, :],
    }
    for i in smollm2_session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, 3, 0, 64), dtype=np.float32)
    out_names = [o.name for o in smollm2_session.get_outputs()]
    out = dict(zip(out_names, smollm2_session.run(None, feeds)))
    logits = out["logits"]
    assert logits.shape == (1, seq, 49152)
    assert np.isfinite(logits).all()
    # A real language model: the text's own next tokens are far likelier than uniform.
    logp = logits[0, :-1] - np.log(np.exp(logits[0, :-1] - logits[0, :-1].max(-1, keepdims=True))
                                   .sum(-1, keepdims=True)) - logits[0, :-1].max(-1, keepdims=True)
    nll = -logp[np.arange(seq - 1), ids[1:]].mean()
    assert nll < 0.5 * np.log(49152), nll
    assert out["present.0.key"].shape == (1, 3, seq, 64)


# ---- MiniLM


def test_minilm_runs(minilm_dir, texts):
    for name in ("model.onnx", "tokenizer.json", "config.json"):
        assert (minilm_dir / name).is_file(), name
    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    enc = tok.encode(_pydoc_sentence(texts["pydoc"]))
    sess = ort.InferenceSession(str(minilm_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    available = {
        "input_ids": enc.ids,
        "attention_mask": enc.attention_mask,
        "token_type_ids": enc.type_ids,
    }
    feeds = {i.name: np.array([available[i.name]], dtype=np.int64) for i in sess.get_inputs()}
    out = sess.run(None, feeds)[0]
    assert out.shape == (1, len(enc.ids), 384)
    assert np.isfinite(out).all()
    model = onnx.load(str(minilm_dir / "model.onnx"), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    mm = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(mm) == 6 * 6  # q, k, v, attention output, intermediate, output x 6 layers


# ---- texts


def test_texts(texts):
    assert set(texts) == {"kjv", "pydoc", "fortunes"}
    kjv = texts["kjv"].read_text(encoding="utf-8")
    pydoc = texts["pydoc"].read_text(encoding="utf-8")
    assert texts["kjv"].stat().st_size > 1_000_000
    assert texts["pydoc"].stat().st_size > 1_000_000
    assert kjv != pydoc
    assert kjv.startswith("Genesis\n\nIn the beginning God created the heaven and the earth.")
    assert "Python" in pydoc and "interpreter" in pydoc
    # markup stripped: no directive lines, section underlines or roles left
    assert not re.search(r"^\.\. ", pydoc, re.M)
    assert not re.search(r"^(=|-|~){4,}$", pydoc, re.M)
    assert len(re.findall(r":(func|class|meth|mod|ref):`", pydoc)) < 50


def test_fortunes_text_is_prose(texts):
    fortunes = texts["fortunes"].read_text(encoding="utf-8")
    assert texts["fortunes"].stat().st_size > 1_000_000
    paras = fortunes.strip().split("\n\n")
    assert len(paras) > 5000
    assert "\n" not in "".join(paras)  # one entry per paragraph, wrapped lines joined
    assert not re.search(r"^[ \t]*(%$|--)", fortunes, re.M)  # no separators, no attribution lines
    assert not any(p.startswith("<") for p in paras)  # no chat logs
    words = fortunes.split()
    assert len(words) > 300_000
    common = collections.Counter(w.lower().strip(".,;:!?\"'") for w in words).most_common(10)
    assert {"the", "a", "to", "of", "and"} <= {w for w, _ in common}
    letters = sum(ch.isalpha() or ch.isspace() for ch in fortunes)
    assert letters > 0.93 * len(fortunes)
    assert "thee" not in {w for w, _ in common} and "Python" not in fortunes[:20000]


def test_fortunes_to_prose():
    text = """\
A closed mouth gathers no foot.
%
It is easier to write an incorrect program
than understand a correct one.
\t\t-- Alan Perlis
%
<nick> hello
<other> hi there
%
   /\\_/\\
  ( o.o )  ~~~ ###
   > ^ < {}[]
%
"""
    assert fortunes_to_prose(text) == [
        "A closed mouth gathers no foot.",
        "It is easier to write an incorrect program than understand a correct one.",
    ]


def test_rst_to_prose():
    rst = """\
Title
=====

.. module:: spam
   :synopsis: Eat spam.

Some *emphasised* text with :func:`len` and ``code``
that wraps, and :ref:`a label <target>`.

.. function:: eggs(x)
              eggs(x, y)
   :noindex:

   Return the eggs for *x*.

   .. note:: Mind the eggs.

   For example::

      eggs(1)

   >>> eggs(2)
   2

.. code-block:: python

   print("dropped")

.. versionadded:: 3.2 The *y* parameter.

* first item
* second item
"""
    out = rst_to_prose(rst)
    paras = out.strip().split("\n\n")
    assert paras[0] == "Title"
    assert "Some emphasised text with len and code that wraps, and a label." in paras
    assert "Return the eggs for x." in paras
    assert "Mind the eggs." in paras
    assert "For example:" in paras
    assert "The y parameter." in paras
    assert paras[-2:] == ["* first item", "* second item"]
    for gone in ("eggs(1)", "eggs(2)", "dropped", "synopsis", "noindex", "eggs(x, y)", "==="):
        assert gone not in out, gone


# ---- conftest: a broken preparation must fail CI, not skip


def _outcome(call) -> str:
    """"failed", "skipped", "raised" or "returned": what ``call()`` does to a test."""
    try:
        call()
    except pytest.fail.Exception:
        return "failed"
    except pytest.skip.Exception:
        return "skipped"
    except BaseException:  # noqa: BLE001 - any other exception errors the test
        return "raised"
    return "returned"


def test_conftest_preparation_failure_fails_under_ci(monkeypatch):
    import conftest
    from scap_onnx import prepare

    def broken() -> None:
        raise RuntimeError("broken preparation")

    monkeypatch.setattr(prepare, "prepare_texts", broken)
    monkeypatch.setenv("CI", "true")
    assert _outcome(lambda: conftest.prepared("prepare_texts")) == "failed"
    monkeypatch.delenv("CI")
    assert _outcome(lambda: conftest.prepared("prepare_texts")) == "skipped"
