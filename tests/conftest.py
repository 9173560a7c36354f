"""Shared fixtures: real registries, the token server and containerd, all on loopback.

Slow things (registries, the daemon) live for the session; what tests mutate (token server knobs
and logs, containerd images) is reset per test: each test gets the token server freshly
``reset()`` and a containerd namespace of its own that is dropped afterwards.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import pytest

from tests.harness.containerd import Containerd, Ctr, write_hosts_toml
from tests.harness.fakeserver import Fake, Handler
from tests.harness.ports import ClosedPort, free_port
from tests.harness.registry import Registry
from tests.harness.tokenserver import TokenServer

E2E_BINARIES = ("containerd", "ctr")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: needs root and a real containerd daemon (skipped when not root)"
    )
    config.addinivalue_line("markers", "slow: takes more than a few seconds (large blobs)")
    config.addinivalue_line(
        "markers", "alone: measures the mirror's memory or file descriptors; under pytest-xdist no "
        "other worker runs a test meanwhile (see _alone)"
    )


def _e2e_skip_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "e2e: containerd needs root (run as root, e.g. via scripts/test)"
    missing = [b for b in E2E_BINARIES if shutil.which(b) is None]
    if missing:
        return f"e2e: {', '.join(missing)} not installed (scripts/test installs them)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _e2e_skip_reason()
    if reason is None:
        return
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item so fixtures can attach logs to failures."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return bool(rep is not None and rep.failed)


@pytest.fixture(autouse=True)
def _alone(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run ``alone`` tests while no other pytest-xdist worker runs a test.

    They measure the mirror's RSS and open file descriptors, which depend on how the load of
    other tests on the CPU interleaves the mirror's work. A readers-writer lock over two files
    that the run's workers share: other tests hold ``lock`` shared; an ``alone`` test takes
    ``gate`` (so no new test starts) and then ``lock`` exclusively (once running tests ended).
    Without xdist there is nothing to wait for.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    folder = tmp_path_factory.getbasetemp().parent  # the run's folder above popen-gwN
    alone = request.node.get_closest_marker("alone") is not None
    with open(folder / "alone.gate", "a") as gate, open(folder / "alone.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        if alone:
            fcntl.flock(lock, fcntl.LOCK_EX)
        else:
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


# --- ports ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def closed_port() -> Iterator[ClosedPort]:
    """A loopback port that refuses connections, held for the session (hosts.toml ``server``)."""
    with ClosedPort() as port:
        yield port


# --- registries ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Anonymous docker-registry; tests push to their own repos (see ``repo_name``)."""
    with Registry("anonymous", workdir=tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture(scope="session")
def htpasswd_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry with Basic auth (bcrypt htpasswd); ``.credentials`` is (user, password)."""
    with Registry("htpasswd", workdir=tmp_path_factory.mktemp("htpasswd-registry")) as r:
        yield r


@pytest.fixture(scope="session")
def htpasswd_credentials(htpasswd_registry: Registry) -> tuple[str, str]:
    assert htpasswd_registry.credentials is not None
    return htpasswd_registry.credentials


@pytest.fixture(scope="session")
def _token_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenServer, Registry]]:
    """Token server + registry; service is the registry's host:port, as on ACR."""
    port = free_port()
    users = {"tester": secrets.token_urlsafe(12)}
    with TokenServer(service=f"127.0.0.1:{port}", users=users) as ts, Registry(
        "token", token_server=ts, port=port,
        workdir=tmp_path_factory.mktemp("token-registry"),
    ) as reg:
        yield ts, reg


@pytest.fixture
def token_server(_token_pair: tuple[TokenServer, Registry]) -> Iterator[TokenServer]:
    """The session's token server, ``reset()`` before and after each test (knobs, logs, tokens)."""
    ts = _token_pair[0]
    ts.reset()
    yield ts
    ts.reset()


@pytest.fixture(scope="session")
def token_registry(_token_pair: tuple[TokenServer, Registry]) -> Registry:
    """docker-registry with token auth via ``token_server``; ``.credentials`` is a token-server
    user that may push and pull."""
    return _token_pair[1]


@pytest.fixture(scope="session")
def token_credentials(token_registry: Registry) -> tuple[str, str]:
    assert token_registry.credentials is not None
    return token_registry.credentials


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """Start extra registries for one test (``Registry`` kwargs); all stopped at teardown."""
    with ExitStack() as stack:
        counter = iter(range(1_000_000))

        def make(mode: str = "anonymous", **kwargs: Any) -> Registry:
            kwargs.setdefault("workdir", tmp_path / f"registry-{next(counter)}")
            return stack.enter_context(Registry(mode, **kwargs))  # type: ignore[arg-type]

        yield make


@pytest.fixture
def token_server_factory() -> Iterator[Callable[..., TokenServer]]:
    """Start extra token servers for one test (``TokenServer`` kwargs); stopped at teardown."""
    with ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(TokenServer(**kwargs))


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository name unique to this test, valid per the distribution name grammar."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"test/{base or 'repo'}-{secrets.token_hex(3)}"


# --- containerd ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def containerd_daemon() -> Iterator[Containerd]:
    """One private containerd for the session (skips when not root)."""
    reason = _e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    with Containerd() as daemon:
        yield daemon


@pytest.fixture
def containerd(containerd_daemon: Containerd, request: pytest.FixtureRequest) -> Iterator[Ctr]:
    """``ctr`` in a fresh namespace for this test; its images and content are dropped after.

    With ``content_sharing_policy = "isolated"`` nothing a previous test pulled is reused.
    """
    ns = "t-" + secrets.token_hex(4)
    client = containerd_daemon.client(ns)
    yield client
    if _failed(request):
        print(f"--- containerd log (tail) {containerd_daemon.log_path} ---")
        print(containerd_daemon.log_text()[-6000:])
    client.drop_namespace()


class HostsDir:
    """A containerd hosts directory (``--hosts-dir``) whose ``server`` lines refuse connections.

    ``write(upstream, hosts)`` writes ``<dir>/<upstream>/hosts.toml``; ``hosts`` is a URL or a list
    of (url, capabilities), tried in order before ``server``. Passing the object where a path is
    expected works (``os.fspath``).
    """

    def __init__(self, path: Path, closed: ClosedPort) -> None:
        self.path = path
        self.server = closed.url

    def write(
        self,
        upstream: str,
        hosts: Union[str, Sequence[tuple[str, Sequence[str]]], None] = None,
        *,
        capabilities: Sequence[str] = ("pull", "resolve"),
        server: Optional[str] = None,
        extra: str = "",
    ) -> Path:
        if isinstance(hosts, str):
            entries: Sequence[tuple[str, Sequence[str]]] = [(hosts, capabilities)]
        else:
            entries = hosts or []
        return write_hosts_toml(self.path, upstream, server or self.server, entries, extra)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


@pytest.fixture
def tmp_hosts_dir(tmp_path: Path, closed_port: ClosedPort) -> HostsDir:
    """A fresh hosts directory for ``ctr --hosts-dir`` (see ``HostsDir``)."""
    path = tmp_path / "certs.d"
    path.mkdir()
    return HostsDir(path, closed_port)


@pytest.fixture
def mirror_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., "Mirror"]]:
    """Start `acr mirror start` processes (see tests.harness.mirror.Mirror); all stopped afterwards.

    On failure the mirrors' logs are printed, since they say what each request decided.
    """
    from tests.harness.mirror import Mirror

    started: list[Mirror] = []

    def make(upstreams: Union[str, Sequence[str]], **kwargs: Any) -> Mirror:
        ups = [upstreams] if isinstance(upstreams, str) else list(upstreams)
        home = kwargs.pop("home", None) or tmp_path / f"mirror{len(started)}"
        m = Mirror(home, ups, **kwargs)
        started.append(m)
        return m

    try:
        yield make
    finally:
        for m in started:
            m.stop()
        if _failed(request):
            for m in started:
                print(f"--- mirror log {m.log_path} ---\n{m.log_text()[-4000:]}")


# --- referrers API in front of the registry (tests/harness/referrers.py) ---------------


@pytest.fixture
def referrers_front(registry: Registry) -> Iterator[Any]:
    """The OCI 1.1 referrers API (and legacy ORAS) in front of the session's ``registry``.

    ``front.mode`` picks how the referrers endpoints answer (oci, none, oras, error, slow,
    garbage, nofilter); everything else is proxied to the registry. Stopped after the test.
    """
    from tests.harness.referrers import ReferrersFront

    with ReferrersFront(registry.url) as front:
        yield front


# --- AAD and IMDS stand-in (tests/harness/aad.py), for `.login-acr` ---------------------


@pytest.fixture(scope="session")
def _aad_stand_in() -> Iterator[Any]:
    from tests.harness.aad import AadStandIn

    with AadStandIn() as stand_in:
        yield stand_in


@pytest.fixture
def aad(_aad_stand_in: Any, token_server: TokenServer) -> Iterator[Any]:
    """AAD + IMDS stand-in, reset per test; every AAD token it issues is one that ``token_server``'s
    ACR exchange accepts (``/oauth2/exchange``), as real ACR accepts its tenant's tokens.
    ``aad.env()`` is the environment that points MSAL at it."""
    _aad_stand_in.reset()
    _aad_stand_in.on_issue = lambda token, subject: token_server.aad_tokens.__setitem__(token, subject)
    yield _aad_stand_in
    _aad_stand_in.on_issue = None
    _aad_stand_in.reset()


@pytest.fixture
def fake_server() -> Iterator[Callable[..., Fake]]:
    """Loopback HTTP servers the test controls (tests/harness/fakeserver.py), stopped after it."""
    servers: list[Fake] = []

    def make(handler: Optional[Handler] = None) -> Fake:
        servers.append(Fake(handler))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()
