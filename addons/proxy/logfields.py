"""The fields of a request's one log line (addons.core.logformat.RequestFields): what a log
shipper indexes instead of parsing the text. Read from the flow's public decision record, the
same record the text line (`front.summary`) and mitmweb show."""

from __future__ import annotations

import functools
import time
from typing import Any

from mitmproxy import http

from addons.core.logformat import REQUEST_ATTR, RequestFields
from addons.proxy.context import read_record
from addons.registry import oci


def client_digest(flow: http.HTTPFlow, meta: dict[str, Any]) -> str | None:
    """The digest the client got: the registry's own for an answer passed on (a schema1
    conversion has another), none for an error, the original one when teleported."""
    resolved = meta.get("resolved")
    teleport = meta.get("teleport") or {}
    answered = flow.response.headers.get(oci.CONTENT_DIGEST_HEADER) if flow.response else None
    if resolved and ("to" in teleport or (not answered and flow.response is not None and flow.response.status_code < 400)):
        return resolved["digest"]
    if answered and meta.get("route") == "manifests":
        return answered
    return None


def teleport_word(meta: dict[str, Any]) -> str | None:
    """`teleported`, or the reason the original was served; None when teleport did not look."""
    teleport = meta.get("teleport") or {}
    if "to" in teleport:
        return "teleported"
    return teleport.get("skipped") or None


def request_fields(flow: http.HTTPFlow) -> RequestFields:
    meta = read_record(flow)
    req = flow.request
    end = flow.response.timestamp_end if flow.response and flow.response.timestamp_end else time.time()
    return RequestFields(
        method=req.method,
        status=flow.response.status_code if flow.response and not flow.error else None,
        kind=meta.get("route") or meta.get("endpoint"),
        repository=meta.get("name"),
        reference=meta.get("reference"),
        digest=client_digest(flow, meta),
        teleport=teleport_word(meta),
        upstream=meta.get("ns") if meta.get("upstream") and not meta.get("refused") else None,
        duration=round(max(end - req.timestamp_start, 0.0), 6) if req.timestamp_start else None,
        error=flow.error.msg if flow.error else None,
    )


def log_extra(flow: http.HTTPFlow) -> dict[str, Any]:
    """The `extra=` of a request's log line: its fields, made only when the format shows them."""
    return {REQUEST_ATTR: functools.partial(request_fields, flow)}
