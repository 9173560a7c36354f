"""Our `[host."URL"]` tables inside a hosts.toml that another tool or a person wrote.

Spegel, Dragonfly's dfinit and people write the same `<registry>/hosts.toml` files as this
mirror, each with its own `[host."..."]` tables; containerd tries the tables in file order, then
`server`. So the mirror adds its tables to such a file instead of replacing it, and takes out
only those tables again. Every byte of the rest of the file stays as it was: our tables are
spliced in as text in front of another table's first line (its comment lines included) or at
the end, and taken out the same way; tomlkit parses the file before and after, and a splice
whose result does not mean exactly "the old file plus (or minus) our tables" is refused, so a
file is never left half-edited or changed in meaning. Our tables carry a comment on their
header line (`MARK`): that is how they are found again, whatever the other tool did around them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tomlkit
from tomlkit.exceptions import ParseError

#: The comment on the header line of each table we add to someone else's file.
MARK = "lifec-registry (acr): 'acr hosts remove' takes out only this table"
_MARK_PREFIX = "lifec-registry (acr)"

#: A table header line: `[a."b".c]`, optionally followed by a comment (never `[[array]]`).
_HEADER_RE = re.compile(r"^[ \t]*\[(?!\[)(?P<key>[^\]#\n]+(?:\][^\]#\n]+)*?)\][ \t]*(?:#(?P<comment>.*))?$")
_COMMENT_RE = re.compile(r"^[ \t]*#")


class MergeError(Exception):
    """The file cannot be edited safely (not TOML, or edited in a way we cannot undo)."""


@dataclass(frozen=True)
class Block:
    """One of our tables, rendered: where it goes among the file's other host tables."""

    url: str
    text: str  # header line with MARK, its keys and sub-tables, no blank line, ends with "\n"
    #: 0 = first; n = before the file's n-th other host table (0-based); None = last.
    position: int | None = 0


def _parse(text: str, what: str) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(text)
    except ParseError as e:
        raise MergeError(f"{what} is not valid TOML ({e})") from None


def _header_key(line: str) -> tuple[list[str], str | None] | None:
    """The dotted key and the comment of a table header line, or None for any other line."""
    m = _HEADER_RE.match(line)
    if not m:
        return None
    try:
        doc = tomlkit.parse(f"[{m.group('key')}]\n")
    except ParseError:
        return None
    path: list[str] = []
    node: Any = doc
    while isinstance(node, dict) and len(node) == 1:
        key = next(iter(node))
        path.append(str(key))
        node = node[key]
    return path, m.group("comment")


def _is_ours(comment: str | None) -> bool:
    return comment is not None and comment.strip().startswith(_MARK_PREFIX)


def host_urls(text: str) -> list[str]:
    """The `[host."URL"]` tables of a file, in file order (the order containerd tries them)."""
    doc = _parse(text, "the file")
    host = doc.get("host")
    return [str(k) for k in host.keys()] if isinstance(host, dict) else []


def marked_urls(text: str) -> list[str]:
    """The host tables of a file that carry our mark, in file order."""
    out = []
    for line in text.splitlines():
        parsed = _header_key(line)
        if parsed and len(parsed[0]) == 2 and parsed[0][0] == "host" and _is_ours(parsed[1]):
            out.append(parsed[0][1])
    return out


def _entry_starts(lines: list[str]) -> list[tuple[int, str]]:
    """(line index, URL) of each host table's header, moved up over the comment lines right above it."""
    starts: list[tuple[int, str]] = []
    seen: set[str] = set()
    for i, line in enumerate(lines):
        parsed = _header_key(line)
        if not parsed or len(parsed[0]) != 2 or parsed[0][0] != "host" or parsed[0][1] in seen:
            continue
        seen.add(parsed[0][1])
        start = i
        while start > 0 and _COMMENT_RE.match(lines[start - 1]):
            start -= 1
        starts.append((start, parsed[0][1]))
    return starts


def _without(data: dict[str, Any], urls: Sequence[str]) -> dict[str, Any]:
    data = dict(data)
    host = data.get("host")
    if isinstance(host, dict):
        rest = {k: v for k, v in host.items() if k not in urls}
        if rest:
            data["host"] = rest
        else:
            del data["host"]
    return data


def merge(text: str, blocks: Sequence[Block]) -> str:
    """`text` with our tables in it (any of ours already there are replaced, and none is added for
    an address the file lists already without our mark)."""
    base = unmerge(text)
    before = _parse(base, "the file")
    lines = base.splitlines(keepends=True)
    others = _entry_starts(lines)
    # A table for our address that someone else wrote already routes through the mirror: keep theirs.
    listed = {u for _, u in others}
    blocks = [b for b in blocks if b.url not in listed]
    inserts: dict[int, list[str]] = {}
    at_end: list[str] = []
    for b in blocks:
        n = b.position
        if n is None or n >= len(others):
            at_end.append(b.text)
        else:
            inserts.setdefault(others[n][0], []).append(b.text + "\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        out.extend(inserts.get(i, ()))
        out.append(line)
    merged = "".join(out)
    if at_end:
        if merged:
            merged += "\n" if merged.endswith("\n") else "\n\n"
        merged += "\n".join(at_end)
    after = _parse(merged, "the merged file")
    if _without(after.unwrap(), [b.url for b in blocks]) != before.unwrap() or set(marked_urls(merged)) != {
        b.url for b in blocks
    }:
        raise MergeError("adding our table would change the file's other entries: left as it is")
    return merged


def unmerge(text: str) -> str:
    """`text` without our marked tables; the rest byte for byte."""
    ours = marked_urls(text)
    if not ours:
        return text
    before = _parse(text, "the file")
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        parsed = _header_key(lines[i])
        if not (parsed and len(parsed[0]) == 2 and parsed[0][0] == "host" and _is_ours(parsed[1])):
            out.append(lines[i])
            i += 1
            continue
        # Our block: its lines up to and including the blank line that ends it, or the end; a
        # header of another table (not one of ours below it) ends it as well.
        ours_key = parsed[0]
        j = i + 1
        while j < len(lines) and lines[j].strip():
            other = _header_key(lines[j])
            if other and other[0][:2] != ours_key:
                break
            j += 1
        if j < len(lines):
            i = j + 1 if not lines[j].strip() else j  # the blank line we put after it
            continue
        i = j
        # At the end of the file: take back the blank line we put in front of it.
        rest = "".join(out)
        if rest.endswith("\n\n"):
            out = [rest[:-1]]
    result = "".join(out)
    after = _parse(result, "the file without our table")
    if after.unwrap() != _without(before.unwrap(), ours) or marked_urls(result):
        raise MergeError("our table was edited by hand: take it out yourself")
    return result
