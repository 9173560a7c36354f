"""Set members of a JSON object in its text, leaving every other byte of the file as it was.

A config file is the operator's: re-serialising it would re-indent it, reorder nothing but still
rewrite every line (numbers, escapes, blank lines, arrays kept on one line). Here only the value
of an owned member is replaced, or the member is added after the object's last one, with the
indentation its siblings already use. The stdlib's own scanner reads the values, so what counts
as JSON is exactly what `json.loads` accepts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


@dataclass
class _Object:
    """Where an object's members are in the text: each value's span, and its closing brace."""

    start: int  # the '{'
    end: int  # the '}'
    members: dict[str, tuple[int, int]]  # key -> (value start, value end)
    key_starts: dict[str, int]  # key -> where its member begins
    last_key: int = -1  # where the last member begins
    last_end: int = -1  # where the last member's value ends


def _skip(text: str, at: int) -> int:
    return _WS.match(text, at).end()  # type: ignore[union-attr]


def _object_at(text: str, at: int) -> _Object:
    """The members of the object whose '{' is at `at` (the text is known to be valid JSON)."""
    obj = _Object(at, -1, {}, {})
    i = _skip(text, at + 1)
    while text[i] != "}":
        obj.last_key = i
        key, i = json.decoder.scanstring(text, i + 1)
        i = _skip(text, _skip(text, i) + 1)  # past ':'
        _, end = _DECODER.raw_decode(text, i)
        # A repeated key: the last one is what json.loads keeps.
        obj.members[key], obj.key_starts[key], obj.last_end = (i, end), obj.last_key, end
        i = _skip(text, end)
        if text[i] == ",":
            i = _skip(text, i + 1)
    obj.end = i
    return obj


def _line_indent(text: str, at: int) -> str | None:
    """The blanks before `at` on its line; None when something else comes first on that line."""
    lead = text[text.rfind("\n", 0, at) + 1:at]
    return None if lead.strip() else lead


def _unit(text: str) -> str:
    """The file's indentation step (overlaybd's example uses 4 spaces); '' for a one-line file."""
    m = re.search(r"\n([ \t]+)\S", text)
    return m.group(1) if m else ""


def _value(value: Any, indent: str | None, unit: str) -> str:
    """`value` as JSON, its nested lines indented under a member at `indent` (None: one line)."""
    if indent is None or not unit:
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, indent=unit, ensure_ascii=False).replace("\n", "\n" + indent)


def _member(key: str, value: Any, indent: str | None, unit: str) -> str:
    return f"{json.dumps(key, ensure_ascii=False)}: {_value(value, indent, unit)}"


def set_members(text: str, path: tuple[str, ...], values: dict[str, Any]) -> str:
    """`text` with the object at `path` (created when missing) holding `values`.

    `text` must be a JSON object (the caller has checked with json.loads); a member along `path`
    that is not an object is replaced by one. Members are added in the order of `values`."""
    unit = _unit(text)
    obj = _object_at(text, _skip(text, 0))
    for depth, key in enumerate(path):
        if key not in obj.members or text[obj.members[key][0]] != "{":  # absent, or e.g. null
            nested: dict[str, Any] = values
            for inner in reversed(path[depth + 1:]):
                nested = {inner: nested}
            if key not in obj.members:
                return _insert(text, obj, {key: nested}, unit)
            start, end = obj.members[key]
            return text[:start] + _value(nested, _line_indent(text, obj.key_starts[key]), unit) + text[end:]
        obj = _object_at(text, obj.members[key][0])
    # Replace from the end of the text, so the spans before stay where they are.
    for key in sorted((k for k in values if k in obj.members), key=lambda k: obj.members[k][0], reverse=True):
        start, end = obj.members[key]
        text = text[:start] + _value(values[key], _line_indent(text, obj.key_starts[key]), unit) + text[end:]
    missing = {k: v for k, v in values.items() if k not in obj.members}
    return _insert(text, _object_at(text, obj.start), missing, unit) if missing else text


def _insert(text: str, obj: _Object, members: dict[str, Any], unit: str) -> str:
    """`members` added after the object's last member, laid out like its siblings."""
    if obj.last_key >= 0:
        indent = _line_indent(text, obj.last_key)
        sep = ", " if indent is None else ",\n" + indent
        added = "".join(sep + _member(k, v, indent, unit) for k, v in members.items())
        return text[:obj.last_end] + added + text[obj.last_end:]
    outer = _line_indent(text, obj.start)
    if not unit or outer is None:  # an empty object on one line
        body = ", ".join(_member(k, v, None, unit) for k, v in members.items())
        return text[:obj.start + 1] + body + text[obj.end:]
    indent = outer + unit
    body = (",\n" + indent).join(_member(k, v, indent, unit) for k, v in members.items())
    return text[:obj.start + 1] + "\n" + indent + body + "\n" + outer + text[obj.end:]
