"""Logs an operator can ship: one format for every line, mitmproxy's and the mirror's, and
`--set acr_log_format=json` for one JSON object per line with a request's fields.

The formatters are checked on log records; the real `acr mirror start` (a subprocess, its
stdout and stderr together, as journald gets them) serves a pull from the recorded ACR session
(tests/replay, `mitmdump --server-replay`), so the request lines carry a real teleport, digest,
upstream and token fetch.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

import pytest
from mitmproxy.test import taddons

from addons.core import logformat
from addons.core.logformat import JsonFormatter, RequestFields, TextFormatter
from addons.observe.logs import LogFormat
from tests.harness.loglines import TEXT_LINE
from tests.harness.replay import http_pull, replay_runmd
from tests.test_readme import check
from tests.test_metrics import SESSION, replay_server  # noqa: F401  (the recorded upstream)

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record(msg: str, level: int = logging.INFO, **attrs: Any) -> logging.LogRecord:
    r = logging.LogRecord("addons.proxy.tail", level, __file__, 1, msg, (), None)
    r.created = 1765166407.684  # 2025-12-08T04:00:07.684Z
    r.__dict__.update(attrs)
    return r


def test_text_lines_have_one_format() -> None:
    assert TextFormatter().format(record("GET /v2/ -> 200")) == \
        "2025-12-08T04:00:07.684Z INFO addons.proxy.tail: GET /v2/ -> 200"
    # mitmproxy's connection lines carry the client address.
    line = TextFormatter().format(record("client connect", logging.DEBUG, client=("127.0.0.1", 50123)))
    assert line == "2025-12-08T04:00:07.684Z DEBUG addons.proxy.tail: [127.0.0.1:50123] client connect"


@pytest.mark.parametrize("level, name", [
    (logging.DEBUG, "DEBUG"), (logging.INFO, "INFO"), (logging.INFO + 1, "INFO"),  # mitmproxy's ALERT
    (logging.WARNING, "WARN"), (logging.ERROR, "ERROR"), (logging.CRITICAL, "ERROR"),
])
def test_levels_are_the_four_shippers_know(level: int, name: str) -> None:
    assert json.loads(JsonFormatter().format(record("x", level)))["level"] == name


def test_json_line_of_a_request_has_its_fields() -> None:
    fields = RequestFields(method="HEAD", status=200, kind="manifests", repository="library/alpine",
                           reference="3", digest="sha256:ab", teleport="no-referrer", upstream="example.azurecr.io",
                           duration=0.0123)
    out = json.loads(JsonFormatter().format(record('HEAD manifests library/alpine:3 -> 200 "quoted"\n', **fields.extra())))
    assert out == {"time": "2025-12-08T04:00:07.684Z", "level": "INFO",
                   "msg": 'HEAD manifests library/alpine:3 -> 200 "quoted"\n', "logger": "addons.proxy.tail",
                   "method": "HEAD", "status": 200, "kind": "manifests", "repository": "library/alpine",
                   "reference": "3", "digest": "sha256:ab", "teleport": "no-referrer",
                   "upstream": "example.azurecr.io", "duration": 0.0123}


def test_json_keeps_a_traceback_on_its_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        r = record("failed", logging.ERROR, exc_info=sys.exc_info())
    line = JsonFormatter().format(r)
    assert "\n" not in line and "RuntimeError: boom" in json.loads(line)["exception"]


def test_the_format_comes_from_set_before_mitmproxy_parses_options() -> None:
    assert logformat.from_sets([], "acr_log_format") == "text"
    assert logformat.from_sets(["acr_log_format=json", "x=1"], "acr_log_format") == "json"
    with pytest.raises(ValueError, match="expected one of text, json"):
        logformat.from_sets(["acr_log_format=yaml"], "acr_log_format")


def test_the_option_sets_the_format_on_the_output_handlers() -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        addon = LogFormat()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, acr_log_format="text")
            assert isinstance(handler.formatter, TextFormatter)
            tctx.configure(addon, acr_log_format="json")
            assert isinstance(handler.formatter, JsonFormatter)
            with pytest.raises(Exception, match="expected one of text, json"):
                tctx.configure(addon, acr_log_format="xml")
            assert isinstance(handler.formatter, JsonFormatter)
    finally:
        root.removeHandler(handler)


# --- the real `acr mirror start` -------------------------------------------------------------


def pulled_mirror(replay_server: Any, mirror_factory: Any, fmt: str | None) -> tuple[Any, str]:
    """A mirror that served a teleported pull and a scrape, stopped; `fmt` None: the default."""
    upstream = replay_server.url(SESSION["registry_origin"])
    mirror = mirror_factory([], runmd=replay_runmd(upstream, "127.0.0.1:{port}"),
                            credentials="replay-refresh-token-not-a-secret",
                            sets=[f"acr_platform={SESSION['platform']}", *([f"acr_log_format={fmt}"] if fmt else [])])
    ns = upstream.split("//", 1)[1]
    result = http_pull(mirror.url, ns, SESSION["repository"], SESSION["tag"], SESSION["platform"])
    assert not result.errors, mirror.log_text()[-2000:]
    assert mirror.get("/metrics").status_code == 200
    mirror.stop()
    return mirror, ns


def test_json_logs_of_a_real_mirror(replay_server: Any, mirror_factory: Any) -> None:  # noqa: F811
    mirror, ns = pulled_mirror(replay_server, mirror_factory, "json")
    lines = [json.loads(line) for line in mirror.log_text().splitlines()]  # every line is JSON
    assert len(lines) > 10
    for line in lines:
        assert RFC3339_UTC.match(line["time"]) and line["level"] in ("DEBUG", "INFO", "WARN", "ERROR"), line
        assert isinstance(line["msg"], str) and line["msg"]
    loggers = {line["logger"] for line in lines}
    assert {"mitmproxy.proxy.mode_servers", "addons.proxy.tail", "addons.runmd.runtime"} <= loggers, loggers
    tag = next(line for line in lines if line.get("kind") == "manifests" and line.get("reference") == SESSION["tag"])
    assert tag["method"] == "HEAD" and tag["status"] == 200 and tag["teleport"] == "teleported"
    assert tag["repository"] == SESSION["repository"] and tag["upstream"] == ns
    assert tag["digest"].startswith("sha256:") and 0 < tag["duration"] < 30
    blobs = [line for line in lines if line.get("kind") == "blobs"]
    assert len(blobs) == len(SESSION["blobs"]) and all(b["status"] == 200 and b["upstream"] == ns for b in blobs)
    assert any(line.get("kind") == "metrics" for line in lines)
    serving = next(line["msg"] for line in lines if line["logger"] == "mitmproxy.proxy.mode_servers")
    assert serving.startswith(f"registry mirror of http://{ns} listening at 127.0.0.1:{mirror.port}"), serving
    raw = next(line for line in mirror.log_text().splitlines() if json.loads(line) == tag)
    check("json-log", f"```json\n{raw}\n```\n", normalize_log)


def normalize_log(text: str) -> str:
    """Times, durations and ports vary from run to run."""
    text = re.sub(r'"time":"[^"]+"', '"time":"T"', text)
    text = re.sub(r'"duration":[0-9.e-]+', '"duration":D', text)
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)


def test_text_logs_of_a_real_mirror_have_one_format(replay_server: Any, mirror_factory: Any) -> None:  # noqa: F811
    mirror, ns = pulled_mirror(replay_server, mirror_factory, None)
    text = mirror.log_text()
    bad = [line for line in text.splitlines() if not TEXT_LINE.match(line)]
    assert not bad, bad
    assert f"INFO mitmproxy.proxy.mode_servers: registry mirror of http://{ns} listening at" in text
    assert "127.0.0.1:9 " not in text and "127.0.0.1:9." not in text and "reverse proxy" not in text
