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

from addons.core.address import Address
from addons.runmd.compile import Compiled
from addons.runmd.engine import EXIT_USAGE

logger = logging.getLogger("acr")

#: containerd's `ns` never carries a scheme; reverse mode needs a target, so a closed port.
PLACEHOLDER_TARGET = "http://127.0.0.1:9"
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


async def serve(compiled: Compiled, address: Address, args: argparse.Namespace) -> int:
    """Run mitmproxy in-process with the runmd's chain until SIGINT or SIGTERM."""
    from mitmproxy import options

    from addons.chain import AcrMirror
    from addons.core.mitm.loop import ReadSize
    from addons.core.mitm.master import mirror_master

    # From here on mitmproxy's termlog prints every log line; ours would print them twice.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG)
    if not args.verbose:
        # Connection open/close lines drown the one line per request the mirror writes.
        logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)
    opts = options.Options()
    if getattr(args, "web", False):  # mitmweb (WebMaster) with the same chain
        master = web_master(opts, args)
    else:
        master = mirror_master(opts)
    opts.update(
        mode=[f"reverse:{PLACEHOLDER_TARGET}@{address.bind_host}:{address.port}"],
        # The mode's own address is what it listens on; these are what mitmweb's status bar shows.
        listen_host=address.bind_host,
        listen_port=address.port,
        connection_strategy="lazy",
        termlog_verbosity="debug" if args.verbose else "info",
    )
    master.addons.add(AcrMirror(compiled), ReadSize())
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
            # Each step declares its own options: one the runmd's steps do not use is kept
            # aside (and said), one nobody knows is an error.
            opts.set(*args.set, defer=True)
            for name in sorted(opts.deferred):
                if not name.startswith("acr_"):
                    raise ServeError(f"bad option: unknown option {name}", EXIT_USAGE)
                logger.warning("option %s: no step of %s uses it", name, compiled.path)
    except Exception as e:  # OptionsError and friends: one line, no traceback
        raise ServeError(f"bad option: {e}", EXIT_USAGE) from None
    if getattr(args, "web", False):
        check_web(opts, args)
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

    web_handlers(master.app)
    return master


def check_web(opts, args: argparse.Namespace) -> None:
    """mitmweb 11.0 has no login: whoever reaches it sees every flow, so loopback only."""
    from addons.core.address import is_loopback

    if not is_loopback(opts.web_host):
        raise ServeError(f"web_host '{opts.web_host}' is not a loopback address: mitmweb has no login, "
                         "so it only listens on this machine", EXIT_USAGE)
    check_listen(Address(opts.web_host, opts.web_port), "mitmweb")
    logger.info("mitmweb on http://%s:%d/ (each flow's comment leads with the mirror's decision: "
                "try the filter ~marked for teleported tags)", opts.web_host, opts.web_port)
