"""One format for every log line, mitmproxy's and the mirror's: text for people, JSON for shippers.

Log shippers (journald forwarders, Fluent Bit, Vector, Loki's agents) read one JSON object per
line with `time` (RFC 3339, UTC), `level` (DEBUG, INFO, WARN, ERROR) and `msg`; a request's line
adds its fields (`RequestFields`) so that nobody has to parse the text. The text format puts the
same time and level in front of every line, so that mitmproxy's lines and the mirror's read alike.
Both are `logging.Formatter`s set on the handlers that write the output: the `acr` command's
stderr handler and mitmproxy's termlog.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

FORMATS = ("text", "json")
#: The attribute of a log record that carries a request's fields (`logger.info(..., extra=...)`):
#: a `RequestFields`, or a function that makes them, called only by a format that shows them.
REQUEST_ATTR = "acr_request"
#: mitmproxy's ALERT (INFO + 1) is an INFO that a UI should draw attention to.
_LEVELS = ((logging.ERROR, "ERROR"), (logging.WARNING, "WARN"), (logging.INFO, "INFO"))


@dataclasses.dataclass(frozen=True)
class RequestFields:
    """What the one line of a request says, as fields (None: did not apply)."""

    method: str
    status: int | None
    kind: str | None = None
    repository: str | None = None
    reference: str | None = None
    digest: str | None = None
    #: `teleported`, or the reason the original was served (`no-referrer`, `timeout`, ...).
    teleport: str | None = None
    upstream: str | None = None
    duration: float | None = None
    error: str | None = None

    def extra(self) -> dict[str, RequestFields]:
        """The `extra=` of the logging call that writes this request's line."""
        return {REQUEST_ATTR: self}


def level_name(levelno: int) -> str:
    for at_least, name in _LEVELS:
        if levelno >= at_least:
            return name
    return "DEBUG"


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def rfc3339(created: float) -> str:
    """`2026-12-08T04:00:07.684Z`: UTC, milliseconds (the second's text made once per second)."""
    second = int(created)
    return f"{_utc_second(second)}.{int((created - second) * 1000):03d}Z"


def _client(record: logging.LogRecord) -> str | None:
    """The client address mitmproxy attaches to its connection lines."""
    client = getattr(record, "client", None)
    if isinstance(client, Sequence) and len(client) >= 2 and not isinstance(client, str):
        host = str(client[0])
        return f"[{host}]:{client[1]}" if ":" in host else f"{host}:{client[1]}"
    return None


class TextFormatter(logging.Formatter):
    """`2026-12-08T04:00:07.684Z INFO addons.proxy.front: HEAD manifests library/alpine:3 -> 200 ...`"""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if client := _client(record):
            message = f"[{client}] {message}"
        line = f"{rfc3339(record.created)} {level_name(record.levelno)} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time`, `level`, `msg`, `logger`, and a request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": level_name(record.levelno),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        if client := _client(record):
            out["client"] = client
        fields = getattr(record, REQUEST_ATTR, None)
        if callable(fields):
            fields = fields()
        if isinstance(fields, RequestFields):
            out.update((k, v) for k, v in vars(fields).items() if v is not None)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def formatter(name: str) -> logging.Formatter:
    if name not in FORMATS:
        raise ValueError(f"log format {name!r}: expected one of {', '.join(FORMATS)}")
    return JsonFormatter() if name == "json" else TextFormatter()


def from_sets(sets: Iterable[str], option: str) -> str:
    """The format that `--set OPTION=VALUE` arguments ask for (the last one wins), or `text`:
    needed before mitmproxy parses its options, for the lines written until then."""
    name = "text"
    for item in sets:
        key, eq, value = item.partition("=")
        if eq and key.strip() == option:
            name = value.strip()
    formatter(name)
    return name


def output_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers of `logger` that write lines out: stream handlers and mitmproxy's termlog
    (not mitmweb's event store, which keeps records for the page)."""
    from mitmproxy.addons.termlog import TermLogHandler

    return [h for h in logger.handlers if isinstance(h, (logging.StreamHandler, TermLogHandler))]


def apply(name: str, logger: logging.Logger | None = None) -> int:
    """Set the format `name` on the output handlers of `logger` (the root); how many."""
    handlers = output_handlers(logger or logging.getLogger())
    for handler in handlers:
        handler.setFormatter(formatter(name))
    return len(handlers)
