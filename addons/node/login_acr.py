"""`.login-acr NAME`: an ACR refresh token for this node's Azure identity, kept fresh.

    : .login-acr      example
    :   .identity     managed          <auto (default), managed, aks, service-principal, az, device>
    :   .client_id    <a user-assigned identity, or the app of a device-code sign-in>
    :   .tenant       <the AAD tenant (service principal, device code, az)>
    :   .credentials  sp.json          <a service principal file, next to the runmd>
    :   .azure_json   /etc/kubernetes/azure.json
    :   .authority    https://login.microsoftonline.com

NAME is the registry's name (the registry is the `.mirror` whose host starts with `NAME.`, else
`NAME.azurecr.io`) or its host or URL. The step gets an AAD token (see addons.registry.aad), exchanges it
at the registry and writes the refresh token, owner-only, to `access_token` beside the runmd,
with its expiry (no secret) in `.work/access_token.meta.json`. While the mirror runs,
`LoginRefresh` repeats the login before that expiry; `.login access_token` notices the new file
by its modification time, so nothing restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx

from addons.core.duration import seconds_option
from addons.core.files import write_private
from addons.registry import aad, acr_exchange
from addons.runmd.compile import Compiled
from addons.registry.oci import Upstream
from addons.runmd.runtime import RuntimePlugin
from addons.runmd.syntax import Step
from addons.runmd.runtime import Runtime, StepError

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,49}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_REGISTRY_DOMAIN = "azurecr.io"
TOKEN_FILE = "access_token"
#: Refresh this long before the refresh token expires (at most half its lifetime before).
DEFAULT_REFRESH_LEAD = 15 * 60.0
#: After a failed refresh, try again this soon (or sooner, when expiry is near).
RETRY_AFTER = 60.0


def meta_path(work: Path) -> Path:
    return work / f"{TOKEN_FILE}.meta.json"


def read_meta(work: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(meta_path(work).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_meta(work: Path, meta: dict[str, Any]) -> None:
    write_private(meta_path(work), json.dumps(meta, indent=2, sort_keys=True) + "\n")


class LoginAcr(RuntimePlugin):
    plugin = "login-acr"
    attributes = ("identity", "tenant", "client_id", "credentials", "azure_json", "authority")

    @classmethod
    def parse(cls, text: str) -> str:
        if not text:
            raise ValueError("expected a registry name, e.g. '.login-acr example'")
        if _NAME_RE.match(text):
            return text.lower()
        if "." in text or ":" in text:
            try:
                return Upstream.from_spec(text).base_url if "://" in text else Upstream.from_spec(text).host
            except ValueError as e:
                raise ValueError(f"expected a registry name, host or URL: {e}") from None
        raise ValueError(f"expected a registry name (letters, digits, '-'), got '{text}'")

    @classmethod
    def parse_attribute(cls, name: str, text: str) -> Any:
        text = text.strip()
        if name == "identity":
            if text.lower() not in aad.IDENTITIES:
                raise ValueError(f"unknown identity '{text}' (known: {', '.join(aad.IDENTITIES)})")
            return text.lower()
        if name in ("tenant", "client_id"):
            if not _ID_RE.match(text):
                raise ValueError(f"expected a {name.replace('_', ' ')} (a GUID or a domain), got '{text}'")
            return text
        if name in ("credentials", "azure_json"):
            if not text or any(c.isspace() for c in text):
                raise ValueError(f"expected a file path, got '{text}'")
            return text
        if name == "authority":
            if not re.match(r"^https://[^/\s]+/?$", text):
                raise ValueError(f"expected an authority host URL like https://login.microsoftonline.com, got '{text}'")
            return text.rstrip("/")
        raise ValueError(f"unknown attribute '.{name}' (known: {', '.join(cls.attributes)})")

    # -- what the step says --------------------------------------------------------

    def identity(self, home: Path) -> aad.Identity:
        values: dict[str, Any] = {}
        for attr in self.step.attributes:
            values[attr.name] = self.parse_attribute(attr.name, attr.input)
        for key in ("credentials", "azure_json"):
            if key in values:
                p = Path(values[key])
                values[key] = p if p.is_absolute() else home / p
        return aad.Identity(
            kind=values.get("identity", "auto"),
            tenant=values.get("tenant"),
            client_id=values.get("client_id"),
            credentials=values.get("credentials"),
            azure_json=values.get("azure_json"),
            authority=values.get("authority"),
        )

    def registry(self, compiled: Compiled) -> Upstream:
        """The registry to log in to: a `.mirror` named NAME.<domain>, else NAME.azurecr.io."""
        name: str = self.config
        if "." in name or ":" in name:
            return Upstream.from_spec(name)
        for _, step in compiled.document.steps("mirror"):
            upstream: Upstream = compiled.config(step)
            if upstream.hostname.startswith(name + "."):
                return upstream
        return Upstream.from_spec(f"{name}.{DEFAULT_REGISTRY_DOMAIN}")

    # -- doing it ------------------------------------------------------------------

    def client(self, runtime: Runtime) -> aad.AadClient:
        return aad.AadClient(self.identity(runtime.home), cache_path=runtime.work / "msal_token_cache.json")

    def login(self, runtime: Runtime, client: aad.AadClient | None = None) -> acr_exchange.RefreshToken:
        """Get, exchange and store a refresh token; StepError names the missing piece."""
        registry = self.registry(runtime.compiled)
        client = client or self.client(runtime)
        try:
            token = client.acquire()
            refresh = acr_exchange.exchange(registry, token)
        except aad.LoginError as e:
            raise StepError(str(e)) from None
        path = runtime.home / TOKEN_FILE
        try:
            write_private(path, refresh.value + "\n")
            write_meta(
                runtime.work,
                {
                    "registry": refresh.registry,
                    "identity": refresh.source,
                    "tenant": refresh.tenant,
                    "file": TOKEN_FILE,
                    "step": self.step.id,
                    "obtained_at": round(time.time(), 3),
                    "expires_at": round(refresh.expires_at, 3),
                },
            )
        except OSError as e:
            raise StepError(f"cannot write {path}: {e.strerror or e}") from None
        logger.info(
            "logged in to %s as %s; %s is valid for %.0f min",
            refresh.registry, refresh.source, path, (refresh.expires_at - time.time()) / 60,
        )
        return refresh

    def run(self, runtime: Runtime) -> None:
        self.login(runtime)


def refresh_due(meta: dict[str, Any], lead: float) -> float | None:
    """When to log in again: `lead` before expiry, but no later than half the token's life."""
    try:
        expires_at = float(meta["expires_at"])
        obtained_at = float(meta.get("obtained_at", expires_at - acr_exchange.DEFAULT_REFRESH_LIFETIME))
    except (KeyError, TypeError, ValueError):
        return None
    life = max(expires_at - obtained_at, 0.0)
    return expires_at - min(lead, life / 2)


class LoginRefresh:
    """Repeats each `.login-acr` before its refresh token expires, while the mirror runs.

    An asyncio task started in `running` sleeps until the token's refresh time (read from the
    meta file, so a login done by `acr mirror start` before serving counts) and runs the login
    in a thread. A failure is logged in one line and retried; the old token keeps serving.
    """

    name = "acr-login-refresh"

    def __init__(self, compiled: Compiled, runtime: Runtime | None = None) -> None:
        self.compiled = compiled
        self.runtime = runtime or Runtime.for_document(compiled)
        self.steps: list[Step] = [s for _, s in compiled.document.steps("login-acr")]
        self.enabled = True
        self.lead = DEFAULT_REFRESH_LEAD
        self.clients: dict[int, aad.AadClient] = {}
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_login_refresh", bool, True,
            "Log in to ACR again (the .login-acr steps) before the refresh token expires.",
        )
        loader.add_option(
            "acr_login_refresh_lead", str, "15m",
            "How long before the ACR refresh token expires to log in again (at most half its lifetime).",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_login_refresh" in updated:
            self.enabled = ctx.options.acr_login_refresh
        if "acr_login_refresh_lead" in updated:
            self.lead = seconds_option(ctx.options.acr_login_refresh_lead, "acr_login_refresh_lead", zero=True)

    def running(self) -> None:
        if self.enabled and self.steps and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.loop(), name=self.name)

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def next_due(self) -> float | None:
        meta = read_meta(self.runtime.work)
        return refresh_due(meta, self.lead) if meta else None

    def refresh(self) -> None:
        """Blocking: run every `.login-acr` step again, then the `.install` steps of its file."""
        for step in self.steps:
            plugin = LoginAcr(step, self.compiled.config(step))
            client = self.clients.setdefault(step.id, plugin.client(self.runtime))
            plugin.login(self.runtime, client)
        for _, step in self.compiled.document.steps("install"):
            if self.compiled.config(step) == TOKEN_FILE:
                cls = self.compiled.classes[step.id]
                cls(step, self.compiled.config(step)).run(self.runtime)  # type: ignore[call-arg, attr-defined]

    async def loop(self) -> None:
        warned = False
        while True:
            due = self.next_due()
            if due is None:
                if not warned:
                    logger.warning("no %s: the ACR login is not refreshed until one exists", meta_path(self.runtime.work))
                    warned = True
                await asyncio.sleep(30)
                continue
            warned = False
            wait = due - time.time()
            if wait > 0:
                await asyncio.sleep(min(wait, 300))
                continue
            try:
                await asyncio.to_thread(self.refresh)
                self.failures = 0
            except StepError as e:
                self.failures += 1
                meta = read_meta(self.runtime.work) or {}
                left = float(meta.get("expires_at", 0)) - time.time()
                retry = max(1.0, min(RETRY_AFTER, left / 4)) if left > 0 else RETRY_AFTER
                logger.error("refreshing the ACR login failed (%d in a row): %s; retrying in %.0f s", self.failures, e, retry)
                if meta:
                    meta.update(refresh_error=str(e), refresh_failed_at=round(time.time(), 3), refresh_failures=self.failures)
                    try:
                        write_meta(self.runtime.work, meta)
                    except OSError:
                        pass
                await asyncio.sleep(retry)
