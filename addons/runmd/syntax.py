"""The runmd language: Markdown whose code fences hold the mirror's pipeline.

This module is the syntax only. It knows nothing about which plugins exist, so the CLI,
`acr_addons.py` and the tests share one parser; `addons.catalog` checks names and inputs
against the plugins afterwards. Every error names the file and the line, because the file
is written by people and a pipeline that silently skips a step is worse than one that stops.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Collection
from dataclasses import dataclass, field
from pathlib import Path

FENCE = "```"
#: Info strings of fences that are documentation examples, not runmd blocks.
DOC_LANGUAGES = frozenset(
    {"sh", "bash", "shell", "console", "text", "toml", "json", "yaml", "yml", "python", "ini", "diff"}
)
COMMENT_PREFIXES = ("#", "//", "-", "*")

_ROOT_RE = re.compile(r"^\+\s*\.(?P<name>[A-Za-z][\w-]*)(?:\s+(?P<input>.*))?$")
_STEP_RE = re.compile(r"^:\s*\.(?P<name>[A-Za-z][\w-]*)(?:\s+(?P<input>.*))?$")
_CONTROL_RE = re.compile(r"^:\s*(?P<name>[A-Za-z_][\w-]*)\s+\.(?P<type>[A-Za-z][\w-]*)(?:\s+(?P<value>.*))?$")
_INLINE_RE = re.compile(r"<[^<>]*>")


class RunmdError(Exception):
    """A mistake in a runmd file, always tied to a file and a line."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")
        self.path = path
        self.line = line
        self.message = message


@dataclass
class Attribute:
    """A line that qualifies the step above it (e.g. `: .arg` under `: .process`)."""

    name: str
    input: str
    line: int


@dataclass
class Step:
    id: int
    plugin: str
    input: str
    line: int
    attributes: list[Attribute] = field(default_factory=list)


@dataclass
class Root:
    id: int
    kind: str
    input: str
    line: int
    steps: list[Step] = field(default_factory=list)


@dataclass
class Control:
    """A block control value, `: name .type value`, written before any root."""

    name: str
    type: str
    value: str
    line: int


@dataclass
class Block:
    name: str
    symbol: str
    line: int
    controls: list[Control] = field(default_factory=list)
    roots: list[Root] = field(default_factory=list)

    @property
    def title(self) -> str:
        return " ".join(p for p in (self.name, self.symbol) if p) or "(unnamed)"


@dataclass
class Document:
    path: str
    blocks: list[Block] = field(default_factory=list)

    def roots(self, kind: str | None = None) -> Iterator[Root]:
        for block in self.blocks:
            for root in block.roots:
                if kind is None or root.kind == kind:
                    yield root

    def steps(self, plugin: str | None = None) -> Iterator[tuple[Root, Step]]:
        for root in self.roots():
            for step in root.steps:
                if plugin is None or step.plugin == plugin:
                    yield root, step

    def ids(self) -> list[int]:
        out: list[int] = []
        for root in self.roots():
            out.append(root.id)
            out.extend(s.id for s in root.steps)
        return out


def _strip_inline(text: str) -> str:
    return _INLINE_RE.sub("", text).strip()


def _fence_info(line: str) -> str | None:
    """The info string of a fence line, or None when the line is no fence."""
    stripped = line.strip()
    if not stripped.startswith(FENCE) or stripped.startswith(FENCE + "`"):
        return None
    return stripped[len(FENCE):].strip()


def parse(
    text: str,
    path: str = "<runmd>",
    attributes: Mapping[str, Collection[str]] | None = None,
) -> Document:
    """Parse runmd text into blocks, roots and numbered steps.

    `attributes` maps a plugin name to the names of the lines that qualify it; such lines
    attach to the step above them instead of becoming steps, so numbering stays stable.
    Roots and steps share one numbering, in document order, starting at 1.
    """
    attributes = attributes or {}
    doc = Document(path=path)
    block: Block | None = None
    skipping_doc_fence, doc_fence_line = False, 0
    next_id = 1
    # Only \n, \r\n and \r end a line: str.splitlines() would also split at form feeds
    # and other separators, and the line numbers in errors would drift from the editor's.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, raw in enumerate(lines, start=1):
        info = _fence_info(raw)
        if skipping_doc_fence:
            if info == "":
                skipping_doc_fence, doc_fence_line = False, 0
            continue
        if block is None:
            if info is None:
                continue
            words = info.split()
            if words and (words[0].lower() in DOC_LANGUAGES or words[0].startswith(("{", "."))):
                skipping_doc_fence, doc_fence_line = True, lineno
                continue
            if words and words[0] == "runmd":
                words = words[1:]
            if len(words) > 2:
                raise RunmdError(path, lineno, f"expected '``` NAME [SYMBOL]' to open a block, got '{raw.strip()}'")
            block = Block(name=words[0] if words else "", symbol=words[1] if len(words) > 1 else "", line=lineno)
            continue
        if info is not None:
            if info:
                raise RunmdError(
                    path, lineno, f"expected '```' to close block '{block.title}' (opened at line {block.line})"
                )
            doc.blocks.append(block)
            block = None
            continue
        line = _strip_inline(raw)
        if not line or line.startswith(COMMENT_PREFIXES):
            continue
        if line.startswith("+"):
            m = _ROOT_RE.match(line)
            if not m:
                raise RunmdError(path, lineno, f"expected '+ .attribute [input]', got '{line}'")
            block.roots.append(Root(id=next_id, kind=m["name"], input=(m["input"] or "").strip(), line=lineno))
            next_id += 1
            continue
        if line.startswith(":"):
            m = _STEP_RE.match(line)
            if m:
                name, value = m["name"], (m["input"] or "").strip()
                if not block.roots:
                    raise RunmdError(
                        path, lineno, f"step '.{name}' before any root: expected '+ .runtime', '+ .proxy ADDR' or '+ .engine' above it"
                    )
                root = block.roots[-1]
                if root.steps and name in attributes.get(root.steps[-1].plugin, ()):
                    root.steps[-1].attributes.append(Attribute(name=name, input=value, line=lineno))
                    continue
                root.steps.append(Step(id=next_id, plugin=name, input=value, line=lineno))
                next_id += 1
                continue
            m = _CONTROL_RE.match(line)
            if m and not block.roots:
                block.controls.append(Control(m["name"], m["type"], (m["value"] or "").strip(), lineno))
                continue
            raise RunmdError(path, lineno, f"expected ': .plugin [input]', got '{line}'")
        raise RunmdError(
            path, lineno, f"expected '+ .root', ': .plugin', a comment or '```', got '{line}'"
        )
    if block is not None:
        raise RunmdError(path, block.line, f"unclosed block '{block.title}': expected a closing '```'")
    if skipping_doc_fence:
        raise RunmdError(path, doc_fence_line, "unclosed code fence: expected a closing '```'")
    return doc


def load(path: str | Path, attributes: Mapping[str, Collection[str]] | None = None) -> Document:
    """Read and parse a runmd file; a missing or unreadable file is a RunmdError too."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise RunmdError(str(p), 0, "no such file (run 'acr init' to write one)") from None
    except IsADirectoryError:
        raise RunmdError(str(p), 0, f"is a folder, not a runmd file (e.g. --runmd {p / 'mirror.runmd'})") from None
    except OSError as e:
        raise RunmdError(str(p), 0, f"cannot read: {e.strerror or e.__class__.__name__}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Name the line, counted the way parse() counts: \n, \r\n and \r end a line.
        before = data[: e.start].decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
        raise RunmdError(str(p), before.count("\n") + 1, f"not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    # Editors on Windows start UTF-8 files with a byte order mark; it is not part of line 1.
    return parse(text.removeprefix("\ufeff"), str(p), attributes)
