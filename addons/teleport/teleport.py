"""`.teleport FORMAT[, FORMAT ...][, MODE]`: answer a tag pull with the streamable copy its referrers name.

containerd trusts the digest that tag resolution reports and checks every later fetch
against the digest it asked for, so only tag resolution is teleported: a request by digest
gets exactly that content. The streamable manifest is fetched and hashed before it is served,
HEAD and GET of a tag take the same decision from the same caches, and any failure serves the
original manifest with the reason recorded. Teleport never breaks a pull.

A streamable copy is made for one snapshotter: overlaybd images for the overlaybd snapshotter,
eStargz images for the stargz snapshotter. `.teleport` lists the formats it may serve, in order
of preference; a referrer's `streaming.format` annotation names its copy's format. The gate
(addons.teleport.gate) says which format this node streams, and the mode says whether to ask
it (`auto`, the default: only that format), to teleport regardless (`always`: the first format
on offer) or never to. The target is checked too: its layers must carry the annotations that
format's converter writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform as platform_module
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import ctx as mitmctx
from mitmproxy import exceptions

from addons.registry import oci
from addons.teleport.discover import DiscoverError, teleport_shared
from addons.registry.oci import Descriptor, Manifest, Platform
from addons.proxy.plugin import ProxyPlugin
from addons.proxy.context import ROCKET, RequestContext, TeleportDecision
from addons.proxy.resolve import accepts, fetch_manifest, manifest_response
from addons.proxy.upstream import NeedsIO, UpstreamError
from addons.runmd.plugin import split_list
from addons.node.containerd_config import DEFAULT_CONFIG
from addons.teleport.gate import MODES, Gate, parse_mode

logger = logging.getLogger(__name__)

FORMATS = ("overlaybd", "estargz")
STREAMING = "application/vnd.azure.artifact.streaming.v1"
STREAMING_LINK = "application/vnd.azure.artifact.streaming.link.v1"
OVERLAYBD_NATIVE = "application/vnd.containerd.overlaybd.native.v1+json"
DADI = "dadi.image.v1"
#: Streamable digests remembered with the tag they were served for (their follow-up GET names it).
MAX_TARGETS_KEPT = 1024
#: Artifact manifests (ORAS's, and the OCI 1.1 release candidates') that early overlaybd converters
#: push: a `dadi.image.v1` referrer of this kind lists the converted image manifest among its `blobs`.
ARTIFACT_MANIFESTS = ("application/vnd.cncf.oras.artifact.manifest.v1+json", "application/vnd.oci.artifact.manifest.v1+json")
#: The layer annotations overlaybd's converter writes (accelerated-container-image): the
#: blob's digest and size; without them the snapshotter would not know the layer is overlaybd.
OVERLAYBD_BLOB_DIGEST = "containerd.io/snapshot/overlaybd/blob-digest"
OVERLAYBD_BLOB_SIZE = "containerd.io/snapshot/overlaybd/blob-size"
#: The layer annotations eStargz converters write (`ctr-remote image convert --estargz`, nerdctl):
#: where the layer's table of contents is, and the uncompressed size the snapshotter needs.
ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ESTARGZ_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
#: Referrer artifact types that can only stand for one format, annotated or not.
IMPLIED_FORMATS = {OVERLAYBD_NATIVE: "overlaybd", DADI: "overlaybd"}
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_MACHINE_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


def parse_platform(text: str) -> Platform:
    """`os/arch[/variant]`, e.g. linux/amd64 or linux/arm/v7."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"expected os/arch[/variant], got '{text}'")
    return Platform(architecture=parts[1], os=parts[0], variant=parts[2] if len(parts) == 3 else None)


def host_platform() -> Platform:
    machine = platform_module.machine().lower()
    arch = _MACHINE_ARCH.get(machine, machine)
    return Platform(architecture=arch, os="linux", variant="v7" if machine == "armv7l" else None)


def platform_matches(want: Platform, os_: str | None, arch: str | None, variant: str | None) -> bool:
    if os_ != want.os or arch != want.architecture:
        return False
    return variant is None or want.variant is None or variant == want.variant


def annotated_platform_matches(d: Descriptor, want: Platform) -> bool | None:
    """None when the referrer names no platform; else whether it names `want`."""
    a = d.annotations or {}
    if "streaming.platform.os" not in a and "streaming.platform.arch" not in a:
        return None
    return platform_matches(want, a.get("streaming.platform.os"), a.get("streaming.platform.arch"), a.get("streaming.platform.variant"))


@dataclass(frozen=True)
class TeleportConfig:
    """`.teleport FORMAT[, FORMAT ...][, MODE]`: the formats in order of preference, and the mode."""

    formats: tuple[str, ...] = ("overlaybd",)
    mode: str = "auto"


def _layer_annotations(body: bytes) -> list[dict[str, Any]] | str:
    """Each layer's annotations of an image manifest, or what is wrong with it."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return "not JSON"
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list) or not layers:
        return "it has no layers"
    out = []
    for layer in layers:
        a = layer.get("annotations") if isinstance(layer, dict) else None
        out.append(a if isinstance(a, dict) else {})
    return out


def _annotated(body: bytes, what: str, digest_key: str, size_key: str) -> str | None:
    """None when every layer carries a digest under `digest_key` and a size under `size_key`."""
    layers = _layer_annotations(body)
    if isinstance(layers, str):
        return layers
    for i, a in enumerate(layers):
        digest, size = a.get(digest_key), a.get(size_key)
        if digest is None or size is None:
            return f"layer {i} is not {what} (no {digest_key} and {size_key.rsplit('/', 1)[-1]} annotations)"
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            return f"layer {i}: {digest_key} is not a digest"
        if not isinstance(size, str) or not size.isdigit():
            return f"layer {i}: {size_key} is not a size in bytes"
    return None


def overlaybd_layers_missing(body: bytes) -> str | None:
    """None when every layer of this image manifest is an overlaybd blob (annotated with its
    blob digest and size, as overlaybd's converter writes them); else what is wrong."""
    return _annotated(body, "an overlaybd blob", OVERLAYBD_BLOB_DIGEST, OVERLAYBD_BLOB_SIZE)


def estargz_layers_missing(body: bytes) -> str | None:
    """None when every layer of this image manifest is an eStargz layer (annotated with its
    TOC digest and uncompressed size); else what is wrong. The stargz snapshotter reads a
    layer lazily only with both."""
    return _annotated(body, "an eStargz layer", ESTARGZ_TOC_DIGEST, ESTARGZ_UNCOMPRESSED_SIZE)


#: How to tell a streamable manifest of each format.
FORMAT_CHECKS = {"overlaybd": overlaybd_layers_missing, "estargz": estargz_layers_missing}


def referrer_format(referrer: Descriptor) -> str | None:
    """The format a referrer names (`streaming.format`), or the one its artifact type implies;
    None when it says nothing (its target's layers then tell)."""
    declared = (referrer.annotations or {}).get("streaming.format")
    return declared.lower() if isinstance(declared, str) else IMPLIED_FORMATS.get(referrer.artifact_type or "")


class NoTeleport(Exception):
    """Why the original manifest is served; `reason` is a short word for mitmweb and metrics."""

    def __init__(self, reason: str, message: str, offered: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        #: The formats the referrers named, when none was one of those wanted.
        self.offered = offered


@dataclass(frozen=True)
class Choice:
    referrer: Descriptor
    target: Descriptor
    format: str


def target_of(referrer: Descriptor) -> Descriptor:
    """The streamable manifest a referrer stands for; raises NoTeleport for a bad link."""
    a = referrer.annotations or {}
    if referrer.artifact_type == STREAMING_LINK:
        try:
            return Descriptor.from_json({
                "mediaType": a.get("streaming.mediaType", ""),
                "digest": a.get("streaming.digest", ""),
                "size": int(a.get("streaming.size", "-1")),
            })
        except ValueError as e:
            raise NoTeleport("bad-json", f"link referrer {referrer.digest}: {e}") from None
    return referrer


def choose(referrers: list[Descriptor], formats: tuple[str, ...], want: Platform, index_level: bool) -> Choice:
    """The first usable referrer of the first format that has one: formats in `.teleport`'s
    order, referrers of a format in discover's order. A referrer that names no format is a
    candidate for each (its target's layers decide).

    At index level only referrers that name the wanted platform count; at manifest level a
    referrer that names another platform is skipped.
    """
    if not referrers:
        raise NoTeleport("no-referrer", "no streamable referrer")
    last: NoTeleport | None = None
    offered: list[str] = []
    for fmt in formats:
        for r in referrers:
            match = annotated_platform_matches(r, want)
            if match is False or (index_level and match is None):
                last = NoTeleport("platform", f"no referrer for {want.os}/{want.architecture}")
                continue
            named = referrer_format(r)
            if named is not None and named != fmt:
                if named not in offered:
                    offered.append(named)
                continue
            try:
                return Choice(r, target_of(r), fmt)
            except NoTeleport as e:
                last = e
    if offered and (last is None or last.reason == "platform"):
        raise NoTeleport("format", f"the referrers offer {', '.join(offered)}, not {', '.join(formats)}", tuple(offered))
    assert last is not None
    raise last


def linked_manifest(body: bytes) -> Descriptor | None:
    """The image manifest a `dadi.image.v1` artifact lists in its `blobs` (or `layers`), if any.

    Early overlaybd converters push an artifact manifest whose `blobs[0]` is the overlaybd image
    manifest; a referrer without such an entry is taken to be the image manifest itself.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise NoTeleport("bad-json", "dadi artifact: not JSON") from None
    if not isinstance(doc, dict):
        raise NoTeleport("bad-json", "dadi artifact: not a JSON object")
    for key in ("blobs", "layers"):
        items = doc.get(key) or []
        if not isinstance(items, list):
            raise NoTeleport("bad-json", f"dadi artifact: {key} is not an array")
        for item in items:
            try:
                d = Descriptor.from_json(item)
            except ValueError as e:
                raise NoTeleport("bad-json", f"dadi artifact: {e}") from None
            if oci.is_manifest_type(d.media_type) and not oci.is_index(d.media_type):
                return d
    return None


def platform_child(body: bytes, want: Platform) -> Descriptor:
    """The index entry for the wanted platform."""
    try:
        doc = json.loads(body)
        entries = [Descriptor.from_json(m) for m in doc.get("manifests", [])]
    except (ValueError, AttributeError, TypeError) as e:  # not an object, `manifests` not a list
        raise NoTeleport("bad-json", f"index: {e}") from None
    except RecursionError:
        raise NoTeleport("bad-json", "index: nested too deeply") from None
    for d in entries:
        p = d.platform
        if p is not None and platform_matches(want, p.os, p.architecture, p.variant):
            return d
    raise NoTeleport("platform", f"the index has no {want.os}/{want.architecture} manifest")


class Teleport(ProxyPlugin):
    plugin = "teleport"
    routes = frozenset({"manifests"})

    @classmethod
    def parse(cls, text: str) -> TeleportConfig:
        items = [i.lower() for i in split_list(text)] or ["overlaybd"]
        mode = parse_mode(items.pop()) if items[-1] in MODES else "auto"
        expected = f"expected '.teleport FORMAT[, FORMAT ...][, MODE]' with formats {' or '.join(FORMATS)} " \
                   f"and a mode {' or '.join(MODES)} last, e.g. 'overlaybd, estargz, auto'"
        if not items:
            raise ValueError(f"{expected}: no format in '{text}'")
        formats: list[str] = []
        for item in items:
            if item in MODES:
                raise ValueError(f"{expected}: the mode '{item}' must come last")
            if item not in FORMATS:
                raise ValueError(f"{expected}: unknown format '{item}'")
            if item in formats:
                raise ValueError(f"{expected}: '{item}' is listed twice")
            formats.append(item)
        return TeleportConfig(tuple(formats), mode)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The node's verdict, shared by every teleport step of this mirror.
        gate = teleport_shared(self.state).gate
        assert gate is not None, "build_state makes the gate for a runmd with .teleport steps"
        self.gate: Gate = gate
        self.gate.mode = self.mode
        if self.state.settings.containerd_config:  # a state made from another's settings (offline replay)
            self.gate.configure(Path(self.state.settings.containerd_config))

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_platform", str, "",
            "The platform teleport picks streamable images for, as os/arch[/variant] "
            "(default: this machine's).",
        )
        loader.add_option(
            "acr_teleport", str, "",
            f"Teleport mode, overriding '.teleport FORMATS, MODE' in mirror.runmd: {', '.join(MODES)} "
            "(auto: only the format this node's containerd streams: overlaybd or estargz).",
        )
        # The option check (addons.chain.declared_options) loads a bare instance, without a gate.
        gate = getattr(self, "gate", None)
        loader.add_option(
            "acr_containerd_config", str, str(gate.config if gate is not None else DEFAULT_CONFIG),
            "containerd's config.toml, read to tell which format this node streams (overlaybd with the "
            "overlaybd snapshotter, estargz with stargz): teleport's auto mode.",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_platform" in updated:
            text = mitmctx.options.acr_platform
            try:
                parse_platform(text) if text else None
            except ValueError as e:
                raise exceptions.OptionsError(f"acr_platform: {e}") from None
            self.state.settings.platform = text
        if "acr_teleport" in updated:
            text = mitmctx.options.acr_teleport
            try:
                self.state.settings.teleport_mode = parse_mode(text) if text else ""
            except ValueError as e:
                raise exceptions.OptionsError(f"acr_teleport: {e}") from None
            self.gate.mode = self.mode
        if "acr_containerd_config" in updated:
            text = mitmctx.options.acr_containerd_config
            if not text:
                raise exceptions.OptionsError("acr_containerd_config: expected the path of containerd's config.toml")
            self.state.settings.containerd_config = text
            self.gate.configure(Path(text))

    async def running(self) -> None:
        """Check the node once at start (in a worker thread), so that the first pull needs no check."""
        if self.mode == "auto":
            await asyncio.to_thread(self.gate.check)

    @property
    def mode(self) -> str:
        return self.state.settings.teleport_mode or self.config.mode

    @property
    def platform(self) -> Platform:
        return parse_platform(self.state.settings.platform) if self.state.settings.platform else host_platform()

    def applies(self, ctx: RequestContext) -> bool:
        """A resolved manifest is being answered with 200: teleport decides about it. Not when
        the registry's own answer for the client's headers is passed on."""
        return (ctx.manifest is not None and not ctx.failed and ctx.teleport is None and not ctx.passed_through
                and ctx.answer is not None and ctx.answer.status_code == 200)

    def ready(self, ctx: RequestContext) -> bool:
        """Decide from memory: a digest, a missing referrer list, or every lookup cached."""
        return self._teleport(ctx, io=False)

    def run(self, ctx: RequestContext) -> None:
        self._teleport(ctx, io=True)

    def decide(self, ctx: RequestContext, io: bool, formats: tuple[str, ...]) -> tuple[Choice, Manifest]:
        """The streamable manifest for this tag in one of `formats`, or NoTeleport (blocking
        unless `io` is False)."""
        original = ctx.manifest
        assert original is not None
        found = ctx.referrers
        if found is None:
            raise NoTeleport("no-discover", "no .discover step in this route")
        if found.error:
            raise NoTeleport(found.error, found.message)
        want = self.platform
        if oci.is_index(original.media_type):
            try:
                choice = choose(found.found, formats, want, index_level=True)
            except NoTeleport:
                child = platform_child(original.body, want)
                assert found.lookup is not None
                try:
                    child_referrers = found.lookup(child.digest, io)
                except DiscoverError as e:
                    raise NoTeleport(e.reason, e.message) from None
                choice = choose(child_referrers, formats, want, index_level=False)
        else:
            choice = choose(found.found, formats, want, index_level=False)
        accept = ctx.lookup_accept or oci.DEFAULT_ACCEPT
        if choice.referrer.artifact_type == DADI:
            artifact = self._fetch(ctx, choice.referrer.digest, "dadi artifact",
                                   ", ".join((*ARTIFACT_MANIFESTS, accept)), io)
            linked = linked_manifest(artifact.body)
            if linked is not None:
                choice = Choice(choice.referrer, linked, choice.format)
            elif oci.base_media_type(artifact.media_type) in ARTIFACT_MANIFESTS:
                raise NoTeleport("format", f"dadi artifact {choice.referrer.digest} lists no image manifest")
        streamable = self._fetch(ctx, choice.target.digest, "streamable manifest", accept, io)
        if streamable.size != choice.target.size:
            raise NoTeleport("size", f"streamable manifest is {streamable.size} B, the referrer says {choice.target.size}")
        if oci.is_index(streamable.media_type) or not oci.is_manifest_type(streamable.media_type):
            raise NoTeleport("format", f"streamable target is a {streamable.media_type}, not an image manifest")
        wrong = FORMAT_CHECKS[choice.format](streamable.body)
        if wrong:
            raise NoTeleport("format", f"streamable manifest {streamable.digest} is not {choice.format}: {wrong}")
        if not accepts(ctx.accept, streamable.media_type):
            raise NoTeleport("accept", f"the client does not accept {streamable.media_type}")
        return choice, streamable

    def _fetch(self, ctx: RequestContext, digest: str, what: str, accept: str, io: bool) -> Manifest:
        """A manifest by digest (checked against it), or NoTeleport; NeedsIO when not cached and not `io`."""
        try:
            manifest, _ = fetch_manifest(self.state, ctx.upstream, ctx.name, digest, accept, ctx.authorizer, io=io)
        except UpstreamError as e:
            reason = "timeout" if e.status == 504 else "auth" if e.code in ("UNAUTHORIZED", "DENIED") else "fetch"
            raise NoTeleport(reason, f"{what}: {e.message}") from None
        return manifest

    def _teleport(self, ctx: RequestContext, io: bool) -> bool:
        assert ctx.manifest is not None
        original = ctx.manifest.digest
        if oci.is_digest(ctx.reference):
            # A teleport's follow-up GET: the client fetches the streamable manifest it was served.
            ctx.teleport_target_of = self.state.teleport_targets.get(ctx.reference)
            self._record(ctx, "digest-pinned", "pulled by digest: served as asked")
            return True
        mode = self.mode
        if mode == "never":
            self._record(ctx, "never", "teleport is set to never")
            return True
        formats = self.config.formats
        verdict = None
        if mode == "auto":
            try:
                verdict = self.gate.verdict(io)
            except NeedsIO:
                return False
            if verdict.format not in formats:
                self._record(ctx, "snapshotter", f"{verdict.describe()}; on offer: {self._offered(ctx)}")
                return True
            formats = (verdict.format,)
        try:
            choice, streamable = self.decide(ctx, io, formats)
        except NeedsIO:
            return False
        except NoTeleport as e:
            if verdict is not None and e.offered:
                # The copies on offer are for another snapshotter than this node's.
                self._record(ctx, "snapshotter", f"{verdict.describe()}; on offer: {', '.join(e.offered)}")
            else:
                self._record(ctx, e.reason, e.message)
            return True
        except Exception as e:  # teleport never breaks a pull
            logger.exception("teleport failed for %s", ctx.name)
            self._record(ctx, "error", e.__class__.__name__)
            return True
        ctx.answer = manifest_response(ctx.method, streamable)
        fmt = choice.format
        ctx.served = streamable
        ctx.teleport = TeleportDecision(original, streamable, fmt, choice.referrer.artifact_type)
        self.state.counters["teleports"] += 1
        self.state.counters["teleport:teleported"] += 1
        ctx.marked = ROCKET
        targets = self.state.teleport_targets
        targets.pop(streamable.digest, None)
        targets[streamable.digest] = f"{ctx.name}:{ctx.reference}"
        while len(targets) > MAX_TARGETS_KEPT:
            targets.pop(next(iter(targets)))
        ctx.note("teleport", f"{original} -> {streamable.digest} ({fmt}, {choice.referrer.artifact_type})")
        logger.debug("teleport %s:%s %s -> %s (%s)", ctx.name, ctx.reference, original, streamable.digest, fmt)
        return True

    def _offered(self, ctx: RequestContext) -> str:
        """The formats this tag's referrers name (as discover found them), else `.teleport`'s."""
        found = ctx.referrers.found if ctx.referrers is not None else []
        named = [f for f in dict.fromkeys(referrer_format(r) for r in found) if f]
        return ", ".join(named or self.config.formats)

    def _record(self, ctx: RequestContext, reason: str, message: str) -> None:
        assert ctx.manifest is not None
        ctx.teleport = TeleportDecision(ctx.manifest.digest, skipped=reason, message=message)
        self.state.counters[f"teleport:{reason}"] += 1
        ctx.note("teleport", f"not teleported: {reason}: {message}")
