"""Recording flows without credentials: the scrubber behind `-w` (save_stream_file) and `scripts/record`.

mitmproxy's flow writer (the built-in `save` addon) writes a flow in its `response` and
`error` hooks, before any script addon runs, and writes still-open flows at shutdown. So a
scrubber that is just another script addon would always be too late. Instead:

* `ScrubbingSave` becomes the class of the built-in `save` addon (the same object keeps its
  place, options, open file and commands) and writes a *scrubbed copy* of every flow, never the
  flow itself: the live flow, which mitmproxy may still send, is untouched, and nothing
  unscrubbed reaches the file, also not through `save.file` (mitmweb's and the console's save).
* `RecordScrub` sits first in the master's chain and scrubs the *request* of a flow in place
  once it is on the wire (from `responseheaders` on), so mitmweb and other addons never show
  the storage SAS URL or a token form either. Responses are not changed in place: a token
  response or a redirect to storage is what the client needs.

What counts as a credential (`scrub_flow`): the values of `Authorization`,
`Proxy-Authorization`, `Cookie` and `Set-Cookie`; query parameters that carry a signature,
token or password (`sig`, `se`, `st`, `token`, `X-Amz-Signature`, ...; the SAS expiry too, so
recordings do not change with the clock) in request URLs, `Location` and in bodies; user
information in URLs; JSON members and form fields named `token`, `access_token`,
`refresh_token`, `password`, ... in bodies; and anything that looks like a JWT, anywhere
(headers, bodies, metadata, comments). Scrubbed values become `<redacted>` (`REDACTED` inside
URLs, where angle brackets would be percent-encoded). Binary bodies (blobs) are left alone.

`mitmdump -s addons/record.py` installs the same two addons without the mirror's chain: that
is the recording reverse proxy `scripts/record` puts in front of a registry.
"""

from __future__ import annotations

import logging
import re
import weakref
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from mitmproxy import flow, http

from addons.core.mitm.master import SaveCopies, put_first_in_chain, swap_addon_class

logger = logging.getLogger(__name__)

REDACTED = "<redacted>"
#: Inside URLs: angle brackets would be percent-encoded by clients and no longer match on replay.
URL_REDACTED = "REDACTED"

#: Query parameters that are (or date) a credential: Azure SAS, S3/GCS presigned URLs, OAuth.
SECRET_PARAMS = frozenset({
    "sig", "se", "st", "skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-amz-date",
    "x-goog-signature", "x-goog-credential", "x-goog-date", "signature", "expires",
    "token", "access_token", "refresh_token", "id_token", "password", "client_secret",
    "client_assertion", "assertion", "code",
})
#: JSON members and form fields that hold a credential.
SECRET_FIELDS = frozenset({
    "token", "access_token", "refresh_token", "id_token", "password", "passwd", "client_secret",
    "client_assertion", "assertion", "secret", "identitytoken", "registrytoken",
})
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-registry-auth"})
URL_HEADERS = frozenset({"location", "content-location", "link", "refresh"})
#: Bodies larger than this are not scanned (they are blobs, not token answers).
MAX_SCAN = 4 * 1024 * 1024

#: A token starts where a run of token characters starts (or after a %XX escape): anchored there
#: the scans below stay linear; unanchored, a 100 KB request path held the event loop for seconds.
JWT_RE = re.compile(r"(?:(?<![A-Za-z0-9_-])|(?<=%[0-9A-Fa-f]{2}))eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_QUERY_PARAM_RE = re.compile(
    r"(?P<lead>[?&;])(?P<key>[A-Za-z0-9_.%-]+)=(?P<value>[^&#\s\"'<>;]*)"
)
#: The same inside a percent-encoded URL (a URL carried in a query, e.g. `/auth?remote_url=`).
_ENCODED_PARAM_RE = re.compile(
    r"(?P<lead>%3[Ff]|%26)(?P<key>[A-Za-z0-9_.-]+)%3[Dd](?P<value>(?:(?!%26)[^&#\s\"'<>;])*)"
)
_USERINFO_RE = re.compile(r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s\"'<>]+)@")
_JSON_FIELD_RE = re.compile(
    r'"(?P<key>[A-Za-z_]+)"(?P<sep>\s*:\s*)"(?P<value>(?:[^"\\]|\\.)*)"'
)
_FORM_FIELD_RE = re.compile(r"(?P<lead>^|&)(?P<key>[^=&]+)=(?P<value>[^&]*)")
_SCHEME_VALUE_RE = re.compile(r"^\s*(?P<scheme>[A-Za-z][A-Za-z0-9_-]*)\s+\S")
_TEXT_TYPES = ("json", "text/", "xml", "x-www-form-urlencoded", "javascript")


# --- pure functions ------------------------------------------------------------------------


def scrub_text(text: str) -> str:
    """JWTs, user information and secret query parameters in free text (bodies, metadata)."""
    text = JWT_RE.sub(REDACTED, text)
    text = _USERINFO_RE.sub(lambda m: f"{m['scheme']}{URL_REDACTED}@", text)

    def param(m: re.Match[str]) -> str:
        if unquote(m["key"]).lower() in SECRET_PARAMS and m["value"] not in ("", URL_REDACTED):
            return f"{m['lead']}{m['key']}={URL_REDACTED}"
        return m.group(0)

    def encoded(m: re.Match[str]) -> str:
        if m["key"].lower() in SECRET_PARAMS and m["value"] not in ("", URL_REDACTED):
            return f"{m['lead']}{m['key']}%3D{URL_REDACTED}"
        return m.group(0)

    text = _QUERY_PARAM_RE.sub(param, text)
    return _ENCODED_PARAM_RE.sub(encoded, text)


def scrub_url(url: str) -> str:
    """A URL without user information and with its secret query values replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{URL_REDACTED}@{netloc.rpartition('@')[2]}"
    query = scrub_text("?" + parts.query)[1:] if parts.query else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub_header_value(name: str, value: str) -> str:
    lower = name.lower()
    if lower not in SECRET_HEADERS and lower not in URL_HEADERS and "eyJ" not in value:
        return value  # no token can be in it: every JWT starts with "eyJ" (`{"` in base64)
    if lower in SECRET_HEADERS:
        m = _SCHEME_VALUE_RE.match(value)
        if lower in ("authorization", "proxy-authorization") and m:
            return f"{m['scheme']} {REDACTED}"
        return REDACTED
    if lower in URL_HEADERS:
        return scrub_text(value)
    return JWT_RE.sub(REDACTED, value)


def scrub_json_text(text: str) -> str:
    """Secret members of a JSON document, by pattern: the rest of the bytes stay as they are."""

    def member(m: re.Match[str]) -> str:
        if m["key"].lower() in SECRET_FIELDS and m["value"] != REDACTED:
            return f'"{m["key"]}"{m["sep"]}"{REDACTED}"'
        return m.group(0)

    return scrub_text(_JSON_FIELD_RE.sub(member, text))


def scrub_form_text(text: str) -> str:
    def field(m: re.Match[str]) -> str:
        if unquote(m["key"]).lower() in SECRET_FIELDS | SECRET_PARAMS and m["value"] not in ("", URL_REDACTED):
            return f"{m['lead']}{m['key']}={URL_REDACTED}"
        return m.group(0)

    return scrub_text(_FORM_FIELD_RE.sub(field, text))


def scrub_data(value: Any) -> Any:
    """Plain data (flow.metadata) with every string scrubbed."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and k.lower() in SECRET_FIELDS and isinstance(v, str) else scrub_data(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub_data(v) for v in value)
    return value


def _is_text(message: http.Message) -> bool:
    ctype = message.headers.get("content-type", "").lower()
    return any(t in ctype for t in _TEXT_TYPES) or not ctype


def scrub_body(message: http.Message) -> None:
    """Scrub a text body in place (JSON members, form fields, URLs, JWTs); binary bodies stay."""
    raw = message.raw_content
    if not raw or len(raw) > MAX_SCAN or not _is_text(message):
        return
    try:
        body = message.get_content(strict=True)
    except ValueError:
        return
    if body is None:
        return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return
    ctype = message.headers.get("content-type", "").lower()
    if "x-www-form-urlencoded" in ctype:
        scrubbed = scrub_form_text(text)
    else:
        scrubbed = scrub_json_text(text)
    if scrubbed != text:
        message.content = scrubbed.encode("utf-8")


def scrub_headers(message: http.Message) -> None:
    for name, value in list(message.headers.items(multi=True)):
        new = scrub_header_value(name, value)
        if new != value:
            values = [scrub_header_value(name, v) for v in message.headers.get_all(name)]
            message.headers.set_all(name, values)


def scrub_request(request: http.Request) -> None:
    """The request's credentials; only call once the request is on the wire (or never will be)."""
    scrub_headers(request)
    path, mark, query = request.path.partition("?")
    if mark and query:
        new = scrub_text("?" + query)[1:]
        if new != query:
            request.path = f"{path}?{new}"
    scrub_body(request)


def scrub_flow(f: flow.Flow) -> flow.Flow:
    """Scrub a flow in place (call it on a copy) and return it."""
    if isinstance(f, http.HTTPFlow):
        scrub_request(f.request)
        if f.response is not None:
            scrub_headers(f.response)
            scrub_body(f.response)
    if f.metadata:
        f.metadata = scrub_data(f.metadata)
    if f.comment:
        f.comment = scrub_text(f.comment)
    return f


def scrubbed_copy(f: flow.Flow) -> flow.Flow:
    """What a flow file gets: a scrubbed copy with the original's id (mitmweb links by id)."""
    out = f.copy()
    out.id = f.id
    return scrub_flow(out)


# --- addons --------------------------------------------------------------------------------


class ScrubbingSave(SaveCopies):
    """The built-in `save` addon, writing scrubbed copies (see the module docstring)."""

    def copy_for_file(self, f: flow.Flow) -> flow.Flow:
        return scrubbed_copy(f)


class RecordScrub:
    """First in the chain: a request's credentials are removed once it has been sent."""

    name = "acr-record-scrub"

    def __init__(self, client_requests: bool = True) -> None:
        self.client_requests = client_requests
        #: live flows already scrubbed (a flow leaves the set with the flow)
        self._scrubbed: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Keep the client's request line (scrubbed): a forwarded flow's request is rewritten to
        its upstream URL, and `ReplayCheck` needs what the client asked to re-run the chain."""
        if not self.client_requests or not flow.live or "acr_client" in flow.metadata:
            return
        req = flow.request
        flow.metadata["acr_client"] = {"method": req.method, "path": scrub_text(req.path), "authority": req.authority}

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._scrub_once(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._scrub_once(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._scrub_once(flow)

    def _scrub_once(self, flow: http.HTTPFlow) -> None:
        """Once the request is on the wire it does not change: a flow that went through
        `responseheaders` is not scrubbed again at `response` (a warm HEAD's own cost)."""
        if flow in self._scrubbed:
            return
        scrub_request(flow.request)
        if flow.live:
            self._scrubbed.add(flow)


def install(master: Any, client_requests: bool = True) -> None:
    """Put the scrubbers in place in `master`: idempotent, for every master (dump, web, tests).
    `client_requests`: keep each client request line in `flow.metadata["acr_client"]` (the mirror)."""
    # Ahead of every built-in addon; after the mirror's token scrubber when it is first.
    if master.addons.get(RecordScrub.name) is None:
        put_first_in_chain(master, RecordScrub(client_requests), after="acr-token-scrub")
    # The flow writer (`-w`, mitmweb's save) keeps its file and options; only its writing changes.
    if swap_addon_class(master, "save", ScrubbingSave):
        logger.debug("flow files are written scrubbed of credentials")


class Recorder:
    """`mitmdump -s addons/record.py -w FILE`: record any traffic with credentials scrubbed."""

    name = "acr-recorder"

    def load(self, loader) -> None:
        from mitmproxy import ctx

        install(ctx.master, client_requests=False)


addons = [Recorder()]
