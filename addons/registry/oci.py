"""
OCI distribution protocol helpers shared by every plugin.

Media types, the reference grammar, digests, error bodies, upstream specs,
`WWW-Authenticate` challenges, `Accept` handling and descriptors live here once,
so that the plugins agree on them and each can be tested without a proxy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from mitmproxy import http

logger = logging.getLogger(__name__)

# --- media types -------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

MANIFEST_TYPES: tuple[str, ...] = (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
)
INDEX_TYPES: frozenset[str] = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})

# Exactly what containerd 1.6 sends when it resolves a reference.
DEFAULT_ACCEPT = ", ".join((*MANIFEST_TYPES, "*/*"))

# --- headers -----------------------------------------------------------------

CONTENT_DIGEST_HEADER = "Docker-Content-Digest"
API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"


def base_media_type(media_type: str) -> str:
    """Drop parameters and case so `Content-Type` values compare as media types."""
    return media_type.split(";", 1)[0].strip().lower()


def is_index(media_type: str) -> bool:
    """An index (manifest list) names platform manifests instead of layers."""
    return base_media_type(media_type) in INDEX_TYPES


def is_manifest_type(media_type: str) -> bool:
    return base_media_type(media_type) in MANIFEST_TYPES


# --- reference grammar (OCI distribution spec) ------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"(?P<algorithm>[a-z0-9]+(?:[+._-][a-z0-9]+)*):(?P<encoded>[a-zA-Z0-9=_-]+)")

# Registered algorithms constrain the encoded part; others only follow the grammar.
_ENCODED_RE: dict[str, re.Pattern[str]] = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}

# The spec notes that clients limit "host[:port]/name" to 255 characters.
MAX_NAME_LENGTH = 255


def valid_name(name: str, registry: str = "") -> bool:
    """
    A repository name as the spec's grammar allows it. With `registry`
    (host[:port]) the length limit covers "registry/name", as clients count it.
    """
    full = f"{registry}/{name}" if registry else name
    return len(full) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


def valid_tag(tag: str) -> bool:
    return TAG_RE.fullmatch(tag) is not None


def valid_digest(digest: str) -> bool:
    m = DIGEST_RE.fullmatch(digest)
    if m is None:
        return False
    encoded_re = _ENCODED_RE.get(m["algorithm"])
    return encoded_re is None or encoded_re.fullmatch(m["encoded"]) is not None


def is_digest(reference: str) -> bool:
    """
    Whether a manifest reference names content by digest rather than by tag.

    Tags cannot contain ":", so this decides the kind of reference only;
    whether the digest is well formed is `valid_digest`'s question.
    """
    return ":" in reference


# --- responses ---------------------------------------------------------------


def make_response(status: int, body: bytes, headers: Mapping[str, str], method: str = "GET") -> http.Response:
    """
    `http.Response.make`, right for HEAD too: mitmproxy 11.0.2 writes a made response's
    body to the socket even for HEAD, so a HEAD answer gets an empty body and the
    Content-Length of the body a GET would get (set after `make`, which counts the body).
    """
    if method.upper() != "HEAD":
        return http.Response.make(status, body, dict(headers))
    response = http.Response.make(status, b"", dict(headers))
    response.headers["Content-Length"] = str(len(body))
    return response


# --- OCI error bodies --------------------------------------------------------


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    """The spec's error document; `detail` is left out when there is none."""
    error: dict[str, Any] = {"code": str(code), "message": message}
    if detail is not None:
        error["detail"] = detail
    return json.dumps({"errors": [error]}, separators=(",", ":")).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    detail: Any = None,
    method: str = "GET",
    *,
    headers: Mapping[str, str] | None = None,
) -> http.Response:
    """An OCI error response (for HEAD without its body, see `make_response`)."""
    all_headers = {
        "Content-Type": "application/json",
        API_VERSION_HEADER: API_VERSION,
        **(headers or {}),
    }
    return make_response(status, error_body(code, message, detail), all_headers, method)


# --- upstream registries -----------------------------------------------------

_HOSTNAME_RE = re.compile(r"(?i)[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def _parse_hostport(netloc: str) -> str:
    """Validate host[:port] and return it lower-cased; ValueError names the problem."""
    if not netloc:
        raise ValueError("empty host")
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise ValueError(f"unterminated IPv6 address in {netloc!r}")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r}") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected characters after IPv6 address in {netloc!r}")
        port = rest[1:] if rest else None
    else:
        host, sep, port_text = netloc.partition(":")
        port = port_text if sep else None
        if not host:
            raise ValueError("empty host")
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"invalid host name {host!r}")
    if port is not None:
        if not port.isdigit() or not port.isascii():
            raise ValueError(f"invalid port {port!r}")
        if not 0 < int(port) < 65536:
            raise ValueError(f"port out of range: {port}")
        return f"{host.lower()}:{int(port)}"
    return host.lower()


@dataclasses.dataclass(frozen=True)
class Upstream:
    """A registry the mirror serves, as containerd names it in `?ns=`."""

    scheme: Literal["https", "http"]
    host: str  # host[:port]

    @classmethod
    def from_spec(cls, spec: str) -> Upstream:
        """
        Parse `example.azurecr.io` (HTTPS), `http://127.0.0.1:5000` (plain HTTP)
        or `https://host:port`. Only a scheme and host[:port] are allowed.
        """
        spec = spec.strip()
        if not spec:
            raise ValueError("empty upstream")
        if "://" not in spec:
            spec = "https://" + spec
        try:
            parts = urllib.parse.urlsplit(spec)
        except ValueError as e:
            raise ValueError(f"invalid upstream: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http"):
            raise ValueError(f"unsupported scheme {parts.scheme!r}: expected https or http")
        if "@" in parts.netloc:
            raise ValueError("user information is not allowed in an upstream")
        if parts.path not in ("", "/"):
            raise ValueError(f"a path is not allowed in an upstream: {parts.path!r}")
        if parts.query or spec.endswith("?"):
            raise ValueError("a query is not allowed in an upstream")
        if parts.fragment or spec.endswith("#"):
            raise ValueError("a fragment is not allowed in an upstream")
        return cls(scheme, _parse_hostport(parts.netloc))  # type: ignore[arg-type]

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def ns(self) -> str:
        return self.host

    @property
    def hostname(self) -> str:
        """The host without port (and without IPv6 brackets)."""
        if self.host.startswith("["):
            return self.host[1 : self.host.index("]")]
        return self.host.rsplit(":", 1)[0] if ":" in self.host else self.host

    def url(self, path: str) -> str:
        if not path.startswith("/"):
            path = "/" + path
        return self.base_url + path

    def __str__(self) -> str:
        return self.base_url


# --- WWW-Authenticate challenges (RFC 7235) ---------------------------------


@dataclasses.dataclass(frozen=True)
class Challenge:
    """One challenge; `scheme` and parameter names are lower-case."""

    scheme: str
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    token68: str | None = None

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SCHEME_RE = re.compile(rf"({_TOKEN})")
_PARAM_RE = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*({_QUOTED}|{_TOKEN})")
_TOKEN68_RE = re.compile(r"([A-Za-z0-9._~+/-]+=*)[ \t]*(?=,|$)")
_SEPARATORS_RE = re.compile(r"[ \t,]*")
_SPACES_RE = re.compile(r"[ \t]*")
_COMMA_RE = re.compile(r"[ \t]*,[ \t]*")
_ESCAPE_RE = re.compile(r"\\(.)")


def parse_challenge(www_authenticate: str) -> list[Challenge]:
    """
    Parse every challenge in a `WWW-Authenticate` value (several header lines
    may be joined with commas). Raises ValueError on text that is not a challenge.
    """
    s = www_authenticate
    pos = 0
    challenges: list[Challenge] = []
    while True:
        pos = _SEPARATORS_RE.match(s, pos).end()  # type: ignore[union-attr]
        if pos >= len(s):
            return challenges
        m = _SCHEME_RE.match(s, pos)
        if m is None:
            raise ValueError(f"expected an auth scheme at position {pos}")
        scheme = m[1].lower()
        pos = m.end()
        params: dict[str, str] = {}
        token68: str | None = None
        after_scheme = _SPACES_RE.match(s, pos).end()  # type: ignore[union-attr]
        if after_scheme > pos and after_scheme < len(s) and s[after_scheme] != ",":
            pos = after_scheme
            if _PARAM_RE.match(s, pos) is None:
                t = _TOKEN68_RE.match(s, pos)
                if t is None:
                    raise ValueError(f"expected auth parameters at position {pos}")
                token68 = t[1]
                pos = t.end()
            else:
                while (p := _PARAM_RE.match(s, pos)) is not None:
                    value = p[2]
                    if value.startswith('"'):
                        value = _ESCAPE_RE.sub(r"\1", value[1:-1])
                    params[p[1].lower()] = value
                    pos = p.end()
                    c = _COMMA_RE.match(s, pos)
                    if c is None:
                        break
                    # A comma ends this parameter; what follows is either another
                    # parameter or the next challenge's scheme.
                    nxt = _SEPARATORS_RE.match(s, pos).end()  # type: ignore[union-attr]
                    if _PARAM_RE.match(s, nxt) is None:
                        break
                    pos = nxt
                rest = _SPACES_RE.match(s, pos).end()  # type: ignore[union-attr]
                if rest < len(s) and s[rest] != ",":
                    raise ValueError(f"unexpected character at position {rest}")
        challenges.append(Challenge(scheme, params, token68))


# --- Accept ------------------------------------------------------------------


def _split_values(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for line in values:
        for value in line.split(","):
            value = value.strip()
            if value and value.lower() not in seen:
                seen.add(value.lower())
                out.append(value)
    return out


def accept_values(headers: http.Headers | Mapping[str, str]) -> list[str]:
    """
    Every media range of every `Accept` line: skopeo repeats the header and
    containerd joins with commas, and folding would lose either.
    """
    if isinstance(headers, http.Headers):
        lines = headers.get_all("accept")
    else:
        lines = [v for k, v in headers.items() if k.lower() == "accept"]
    return _split_values(lines)


def merge_accept(client_values: Iterable[str], configured: Iterable[str]) -> str:
    """
    The `Accept` to send upstream: what the client asked for plus the types the
    route is configured to resolve, `*/*` last; containerd's list when both are empty.
    """
    values = _split_values([*client_values, *configured])
    if not values:
        return DEFAULT_ACCEPT
    specific = [v for v in values if v != "*/*"]
    if len(specific) != len(values):
        specific.append("*/*")
    return ", ".join(specific)


# --- descriptors -------------------------------------------------------------


def _str_map(value: Any, field: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{field}: expected an object of strings")
    return dict(value)


def _str_list(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field}: expected a list of strings")
    return value


def _opt_str(data: Mapping[str, Any], key: str, field: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{field}: expected a string")
    return value


@dataclasses.dataclass(frozen=True)
class Platform:
    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] | None = None

    @classmethod
    def from_json(cls, data: Any) -> Platform:
        if not isinstance(data, dict):
            raise ValueError("platform: expected an object")
        architecture = data.get("architecture")
        os_ = data.get("os")
        if not isinstance(architecture, str) or not isinstance(os_, str):
            raise ValueError("platform: architecture and os must be strings")
        features = data.get("os.features")
        if features is not None:
            features = _str_list(features, "platform.os.features")
        return cls(
            architecture=architecture,
            os=os_,
            variant=_opt_str(data, "variant", "platform.variant"),
            os_version=_opt_str(data, "os.version", "platform.os.version"),
            os_features=tuple(features) if features is not None else None,
        )


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor, as found in indexes, manifests and referrers."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] | None = None
    artifact_type: str | None = None
    platform: Platform | None = None
    urls: tuple[str, ...] | None = None
    data: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> Descriptor:
        """Validate a descriptor object from an upstream document; ValueError names the field."""
        if not isinstance(data, dict):
            raise ValueError("descriptor: expected an object")
        media_type = data.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise ValueError("descriptor.mediaType: expected a non-empty string")
        digest = data.get("digest")
        if not isinstance(digest, str) or not valid_digest(digest):
            raise ValueError("descriptor.digest: expected a valid digest")
        size = data.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError("descriptor.size: expected a non-negative integer")
        annotations = data.get("annotations")
        if annotations is not None:
            annotations = _str_map(annotations, "descriptor.annotations")
        platform = data.get("platform")
        urls = data.get("urls")
        if urls is not None:
            urls = _str_list(urls, "descriptor.urls")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=annotations,
            artifact_type=_opt_str(data, "artifactType", "descriptor.artifactType"),
            platform=Platform.from_json(platform) if platform is not None else None,
            urls=tuple(urls) if urls is not None else None,
            data=_opt_str(data, "data", "descriptor.data"),
        )


# --- scopes ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A manifest as fetched: its bytes, their digest and the media type it was served as."""

    media_type: str
    digest: str
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)

    def as_dict(self) -> dict[str, object]:
        return {"digest": self.digest, "media_type": self.media_type, "size": self.size}


def scope_for(name: str, actions: Sequence[str] = ("pull",)) -> str:
    """
    The token scope for a repository. The name is checked because it is
    copied into a request to the token endpoint.
    """
    if not valid_name(name):
        raise ValueError(f"invalid repository name: {name!r}")
    return f"repository:{name}:{','.join(actions)}"
