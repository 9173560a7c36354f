"""The mirror's mitmproxy master, built and run in this process: `acr mirror start` and `serve`.

addons/chain.py is the addon chain; this module is the master around it (mitmdump's, or mitmweb's
with `--web`), its options from the runmd and `--set`, and its signals. mitmproxy is imported only
when the master is built, so `acr --help` never pays for it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from pathlib import Path
from typing import Any

from addons.core.address import Address
from addons.runmd.compile import Compiled
from addons.runmd.engine import EXIT_USAGE

logger = logging.getLogger("acr")

#: The flow list's columns in `--web`: the URL is where the answer came from (the registry or
#: storage), the comment leads with what the mirror decided.
WEB_COLUMNS = ["icon", "method", "path", "status", "size", "time", "comment"]
DEFAULT_WEB_PORT = 8081


class ServeError(Exception):
    """A one-line error for the operator (the mirror cannot serve as asked), with the exit code to leave with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def check_listen(address: Address, who: str = "") -> None:
    """Fail before any runtime step runs when `who` (the mirror, or mitmweb) cannot bind its address."""
    family = socket.AF_INET6 if ":" in address.bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address.bind_host, address.port))
        except OSError as e:
            raise ServeError(f"{who + ' ' if who else ''}cannot listen on {address}: {e.strerror}") from None


def hosts_dir_of(args: argparse.Namespace) -> Path:
    """The hosts folder the runtime steps install into, which the running mirror then watches."""
    from addons.node.containerd_config import DEFAULT_HOSTS_DIR

    return Path(getattr(args, "hosts_dir", None) or DEFAULT_HOSTS_DIR)


def build(compiled: Compiled, address: Address, args: argparse.Namespace) -> Any:
    """The master (mitmdump's, or mitmweb's with `--web`) with the runmd's chain and every option
    set, `--set` included; ServeError (one line) for an option nobody declared or a value its
    addon refuses. mitmproxy builds a master in a running event loop."""
    from mitmproxy import options

    from addons.chain import AcrMirror, declared_options
    from addons.core import mirror_mode
    from addons.node.listen import upstream_listens
    from addons.core.mitm.loop import ReadSize
    from addons.core.mitm.master import mirror_master
    from addons.core.optioncheck import unknown_option

    opts = options.Options()
    if getattr(args, "web", False):  # mitmweb (WebMaster) with the same chain
        master = web_master(opts, args)
    else:
        master = mirror_master(opts)
    mirror = AcrMirror(compiled)
    upstreams = [u.base_url for u in mirror.state.upstreams.values()] if mirror.state else []
    opts.update(
        # The log's start line and mitmweb's status bar name the registries the mirror serves;
        # `.listen` addresses are further listeners of the same chain (the proxy root routes by port).
        mode=[mirror_mode.spec(upstreams, address.bind_host, address.port),
              *(mirror_mode.spec([u.upstream.base_url], u.address.bind_host, u.address.port)
                for u in upstream_listens(compiled))],
        # The mode's own address is what it listens on; these are what mitmweb's status bar shows.
        listen_host=address.bind_host,
        listen_port=address.port,
        connection_strategy="lazy",
        termlog_verbosity="debug" if args.verbose else "info",
    )
    master.addons.add(mirror, ReadSize())
    try:
        opts.update(acr_runmd=str(Path(compiled.path).resolve()))
        if getattr(args, "mirror_command", "") == "start" and "acr_hosts_dir" in opts:
            # The runmd has `.host` steps; `serve` gets the folder from its engine (--set).
            opts.update(acr_hosts_dir=str(hosts_dir_of(args)))
        # `.https CERT` serves TLS with that key and certificate, for every name.
        from addons.node.https import certs_option

        if certs_option(compiled):
            # HTTP/1.1 only: an HTTP/2 request carries :authority, which the proxy root refuses as
            # forward-proxy (absolute-form) traffic; clients negotiate h2 over TLS when offered.
            opts.update(certs=certs_option(compiled), http2=False)
        if args.set:
            # Each step declares its own options in `load`: one still unknown once the whole
            # chain is loaded is a typo, or belongs to a step this runmd does not have.
            opts.set(*args.set, defer=True)
    except Exception as e:  # OptionsError and friends: one line, no traceback
        raise ServeError(f"bad option: {e}", EXIT_USAGE) from None
    steps = declared_options() if opts.deferred else set()
    for name in sorted(opts.deferred):
        if name not in steps:
            raise ServeError(f"bad option: {unknown_option(name, set(opts.keys()) | steps)}", EXIT_USAGE)
        logger.warning("option %s: no step of %s uses it", name, compiled.path)
    if getattr(args, "web", False):
        check_web(opts, args)
    return master


def check(compiled: Compiled, address: Address, args: argparse.Namespace) -> None:
    """What `serve` would refuse, found before the first runtime step changes anything: the
    master is built as `serve` builds it, in an event loop of its own, and discarded."""
    from addons.core.mitm.master import discard

    async def build_and_discard() -> None:
        await discard(build(compiled, address, args))

    asyncio.run(build_and_discard())


async def serve(compiled: Compiled, address: Address, args: argparse.Namespace) -> int:
    """Run mitmproxy in-process with the runmd's chain until SIGINT or SIGTERM."""
    # From here on mitmproxy's termlog prints every log line; ours would print them twice.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG)
    if not args.verbose:
        # Connection open/close lines drown the one line per request the mirror writes.
        logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)
    master = build(compiled, address, args)
    opts = master.options
    if getattr(args, "web", False):
        logger.info("mitmweb on http://%s:%d/ (each flow's comment leads with the mirror's decision: "
                    "try the filter ~marked for teleported tags)", opts.web_host, opts.web_port)
    elif opts.termlog_verbosity != "debug":
        # A debug record walks the whole addon chain even when nothing prints it: made only
        # when something shows it (-v or termlog_verbosity=debug, mitmweb's event log).
        root.setLevel(logging.INFO)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    await master.run()
    logger.info("mirror stopped")
    return 0


def web_master(opts, args: argparse.Namespace):
    """mitmweb's master on loopback, without opening a browser: inspect flows as they pass."""
    from mitmproxy.tools.web.master import WebMaster

    master = WebMaster(opts, with_termlog=True)
    opts.update(web_host="127.0.0.1", web_port=args.web_port, web_open_browser=False, web_columns=WEB_COLUMNS)
    if not args.verbose:
        # The page polls; one access line per poll would drown the mirror's one line per request
        # (mitmproxy's own launcher quiets this logger the same way).
        logging.getLogger("tornado").setLevel(logging.WARNING)
    from addons.core.mitm.web import web_handlers
    from addons.proxy.context import read_record

    web_handlers(master.app, lambda flow: read_record(flow).get("streamed"))
    return master


def check_web(opts, args: argparse.Namespace) -> None:
    """mitmweb 11.0 has no login: whoever reaches it sees every flow, so loopback only."""
    from addons.core.address import is_loopback

    if not is_loopback(opts.web_host):
        raise ServeError(f"web_host '{opts.web_host}' is not a loopback address: mitmweb has no login, "
                         "so it only listens on this machine", EXIT_USAGE)
    check_listen(Address(opts.web_host, opts.web_port), "mitmweb")
