"""Plain prose from marked-up sources: reStructuredText (the CPython documentation) and
fortune files (Debian's ``fortunes``).  Pure functions of strings; standard library only."""

from __future__ import annotations

import re

__all__ = ["fortunes_to_prose", "rst_to_prose"]


# ---- reStructuredText

# Directives whose body is prose (kept, dedented); the body of any other directive is dropped.
_PROSE_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator",
    "decoratormethod", "classmethod", "staticmethod", "describe", "option", "cmdoption",
    "envvar", "opcode", "pdbcommand", "monitoring-event", "module", "currentmodule",
    "note", "warning", "important", "tip", "caution", "attention", "danger", "error", "hint",
    "admonition", "seealso", "deprecated", "deprecated-removed", "versionadded",
    "versionchanged", "impl-detail", "topic", "sidebar", "rubric", "glossary", "c:function",
    "c:member", "c:macro", "c:type", "c:var", "c:struct", "c:enum", "c:enumerator",
    "c:data", "c:func", "availability", "audit-event", "abstractmethod", "coroutinefunction",
    "coroutinemethod", "awaitablefunction", "awaitablemethod", "property", "hlist",
    "versionremoved", "centered", "epigraph", "highlights", "pull-quote", "container",
}
# Directives whose argument on the directive line is itself prose.
_INLINE_TEXT_DIRECTIVES = {
    "note", "warning", "important", "tip", "caution", "attention", "danger", "error", "hint",
    "seealso", "deprecated", "versionadded", "versionchanged", "versionremoved", "rubric",
    "impl-detail", "topic", "centered", "admonition", "deprecated-removed",
}
_VERSION_ARG_DIRECTIVES = {
    "deprecated", "versionadded", "versionchanged", "versionremoved", "deprecated-removed",
}

_DIRECTIVE_RE = re.compile(r"^(\s*)\.\.(?:\s+([\w:-]+)::(.*))?")
_ADORNMENT_RE = re.compile(r"^\s*([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
_TABLE_RULE_RE = re.compile(r"^\s*[=\-+|: ]+$")
_BULLET_RE = re.compile(r"^(?:[*\-+•]|#\.|\d+\.|\(?[a-z0-9]\))\s+")
_FIELD_RE = re.compile(r"^\s*:[\w -]+:(\s|$)")

_ROLE_RE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_LITERAL_RE = re.compile(r"``(.+?)``")
_LINK_RE = re.compile(r"`([^`<]*?)\s*(?:<[^>]*>)?`__?")
_INTERP_RE = re.compile(r"`([^`]+)`")
_STRONG_RE = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPH_RE = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_FOOTREF_RE = re.compile(r"\s*\[(?:#\w*|\*|\d+)\]_")


def _role_text(m: re.Match) -> str:
    text = m.group(1)
    t = re.match(r"^(.*?)\s*<[^>]*>$", text, re.S)
    if t and t.group(1):
        text = t.group(1)
    return text.lstrip("~!")


def _inline(text: str) -> str:
    text = _ROLE_RE.sub(_role_text, text)
    text = _LITERAL_RE.sub(r"\1", text)
    text = _LINK_RE.sub(r"\1", text)
    text = _INTERP_RE.sub(r"\1", text)
    text = _STRONG_RE.sub(r"\1", text)
    text = _EMPH_RE.sub(r"\1", text)
    text = _FOOTREF_RE.sub("", text)
    text = text.replace("\\ ", "").replace("\\*", "*").replace("\\", "")
    return text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_to_prose(rst: str) -> str:
    """Lightly strip reStructuredText markup, keeping the prose.

    Drops section adornments, table rules, comments, link targets and non-prose directives
    (code blocks, toctrees, images, ...) with their bodies, literal blocks after ``::`` and
    doctest blocks; keeps the bodies of prose directives (function descriptions, notes, ...);
    reduces inline markup to its text and joins wrapped lines into one line per paragraph.
    """
    lines = rst.expandtabs(8).splitlines()
    kept: list[str] = []  # stripped lines; "" marks a paragraph break
    skip_indent: int | None = None  # dropping a block: lines indented deeper than this
    skip_args: str | None = None  # "all" or "fields": see below
    i = 0
    para_indent = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        stripped = line.strip()
        if skip_indent is not None:
            if not stripped or _indent(line) > skip_indent:
                continue
            skip_indent = None
        if skip_args is not None:
            # after a prose directive: its option lines (:noindex:) and, for descriptions,
            # continued signatures, up to the first blank line
            if stripped and (skip_args == "all" or _FIELD_RE.match(line)):
                continue
            skip_args = None
        if not stripped:
            kept.append("")
            continue
        m = _DIRECTIVE_RE.match(line)
        if m and (stripped == ".." or stripped.startswith(".. ")):
            ind = len(m.group(1))
            name = (m.group(2) or "").lower()
            if name in _PROSE_DIRECTIVES:
                arg = (m.group(3) or "").strip()
                if name in _INLINE_TEXT_DIRECTIVES and arg:
                    if name in _VERSION_ARG_DIRECTIVES:
                        arg = re.sub(r"^[\d.]+(\s*,?\s*[\d.]+)?\s*", "", arg)
                    if arg:
                        kept.append("")
                        kept.append(arg)
                kept.append("")
                skip_args = "fields" if name in _INLINE_TEXT_DIRECTIVES else "all"
            else:
                skip_indent = ind
            continue
        if _ADORNMENT_RE.match(line) or _TABLE_RULE_RE.match(line):
            continue
        if stripped.startswith(">>>"):
            # doctest block: runs to the next blank line
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
            continue  # grid table row
        para_indent = _indent(line) if (not kept or kept[-1] == "") else para_indent
        if stripped.endswith("::"):
            text = stripped[:-2].rstrip()
            if text:
                kept.append(text + ":" if not text.endswith(":") else text)
            skip_indent = para_indent
            # a literal block must follow after a blank line; drop it
            continue
        kept.append(stripped)

    # Join wrapped lines into paragraphs; list items start a new line.
    out: list[str] = []
    cur: list[str] = []
    for s in kept + [""]:
        if not s:
            if cur:
                out.append(" ".join(cur))
                cur = []
            continue
        if cur and _BULLET_RE.match(s):
            out.append(" ".join(cur))
            cur = []
        cur.append(s)
    # inline markup is reduced per paragraph: roles and literals often wrap across lines
    paras = [" ".join(_inline(p).split()) for p in out]
    return "\n\n".join(p for p in paras if len(p) > 1) + ("\n" if paras else "")


# ---- fortunes

_FORTUNE_ATTRIBUTION_RE = re.compile(r"^\s*--")
_FORTUNE_CHAT_RE = re.compile(r"^<[^<>\s]+>\s")  # "<nick> text"


def fortunes_to_prose(text: str) -> list[str]:
    """The entries of a fortune file (separated by lines holding ``%``) as paragraphs: wrapped
    lines joined, attribution lines (``-- Author``) dropped, and entries that are not prose (too
    few letters: pictures, code) or chat logs dropped."""
    out = []
    for entry in re.split(r"^%\s*$", text, flags=re.M):
        lines = [ln.strip() for ln in entry.splitlines()]
        lines = [ln for ln in lines if ln and not _FORTUNE_ATTRIBUTION_RE.match(ln)]
        if not lines or any(_FORTUNE_CHAT_RE.match(ln) for ln in lines):
            continue
        para = " ".join(" ".join(lines).split())
        letters = sum(ch.isalpha() or ch.isspace() for ch in para)
        if len(para) < 2 or letters < 0.85 * len(para):
            continue
        out.append(para)
    return out
