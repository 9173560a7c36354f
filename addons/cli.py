"""The `acr` command: write a mirror.runmd, show its steps, run the mirror.

Every failure is one line on stderr and a non-zero exit: an operator reading a node's
journal should see what is wrong without a traceback to dig through.
"""

from __future__ import annotations

import argparse
import logging
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from addons import __version__

from addons.core.files import atomic_write
from addons.core.address import Address
from addons.runmd.compile import Compiled
from addons.runmd.engine import EXIT_USAGE
from addons.runmd.syntax import RunmdError
from addons.runmd.runtime import Runtime, StepError
from addons.serve import DEFAULT_WEB_PORT, ServeError, check_listen, hosts_dir_of, serve

if TYPE_CHECKING:
    from addons.runmd.engine import EngineSpec

logger = logging.getLogger("acr")

DEFAULT_ARTIFACT_TYPES = (
    "application/vnd.azure.artifact.streaming.v1",
    "application/vnd.azure.artifact.streaming.link.v1",
    "application/vnd.containerd.overlaybd.native.v1+json",
)


def _catalog() -> Any:
    """The plugin catalog, imported when a command needs it: it imports every plugin and with
    them mitmproxy (about 1.5 s), which `acr --help` and a usage error never need."""
    from addons import catalog

    return catalog


class CliError(Exception):
    """A one-line error for the operator, with the exit code to leave with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def template_path() -> Path:
    """The template beside the package (source checkout) or in the installed data folder."""
    for candidate in (
        Path(__file__).resolve().parent.parent / "mirror.runmd.template",
        Path(sys.prefix) / "share" / "lifec-registry" / "mirror.runmd.template",
    ):
        if candidate.is_file():
            return candidate
    raise CliError("mirror.runmd.template is not installed")


#: Why `acr init` writes `.pull client` for ACR (measured by scripts/bench_redirects.py).
ACR_BLOB_PULL_NOTE = (
    "    For ACR this file uses `.pull client`: ACR answers every blob with a redirect to blob\n"
    "    storage, and containerd fetching from storage itself was measured as fast as the\n"
    "    mirror relaying the bytes (within the spread of the runs) for a fifth of the mirror's\n"
    "    CPU (scripts/bench_redirects.py). The redirect carries a short-lived SAS URL, never\n"
    "    your token. Write `.pull` to have the mirror fetch and check the bytes itself (e.g.\n"
    "    where nodes cannot reach blob storage).\n"
)


def render_template(
    *,
    registry: str | None,
    registry_host: str,
    mirror_address: str,
    upstream: str | None,
    teleport_format: str,
    artifact_types: Sequence[str],
) -> str:
    """Fill the template; with `upstream` the ACR login steps are left out."""
    if upstream:
        upstream_spec = upstream
        host = upstream.split("://", 1)[-1]
        runtime_steps = ""
        login_acr_note = ""
        runtime_notes = (
            f"This mirror serves `{upstream}`. Put its credentials (if it needs any) in a file "
            "`access_token` next to this file: `user:password`, or a bare refresh token.\n"
        )
        blob_pull, blob_pull_note = ".pull", ""
    else:
        if not registry:
            raise CliError("acr init needs --registry NAME (or --upstream URL)", EXIT_USAGE)
        host = f"{registry}.{registry_host}"
        upstream_spec = host
        runtime_steps = f": .login-acr    {registry}\n: .install      access_token\n"
        login_acr_note = (
            f"- `.login-acr {registry}` signs in to Azure with this node's identity and writes an ACR\n"
            "  refresh token to `access_token` next to this file.\n"
            "- `.install access_token` copies it, owner-only, into the work folder `.work/`.\n"
        )
        runtime_notes = f"This mirror serves the Azure Container Registry `{host}`.\n"
        blob_pull, blob_pull_note = ".pull         client", ACR_BLOB_PULL_NOTE
    return string.Template(template_path().read_text()).substitute(
        registry_host=host,
        runtime_notes=runtime_notes,
        login_acr_note=login_acr_note,
        runtime_steps=runtime_steps,
        upstream=upstream_spec,
        mirror_address=mirror_address,
        teleport_format=teleport_format,
        artifact_types=", ".join(artifact_types),
        blob_pull=blob_pull,
        blob_pull_note=blob_pull_note,
    )


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.runmd)
    if path.is_dir():
        raise CliError(f"{path} is a folder: --runmd names the file to write, e.g. --runmd {path / 'mirror.runmd'}", EXIT_USAGE)
    if path.exists() and not args.force:
        raise CliError(f"{path} exists; use --force to overwrite it", EXIT_USAGE)
    text = render_template(
        registry=args.registry,
        registry_host=args.registry_host,
        mirror_address=args.mirror_address,
        upstream=args.upstream,
        teleport_format=args.teleport_format,
        artifact_types=args.artifact_type or DEFAULT_ARTIFACT_TYPES,
    )
    try:
        _catalog().parse_text(text, str(path))
    except RunmdError as e:
        # The options made a file the mirror would refuse: say which option, not which line.
        raise CliError(f"these options make an invalid mirror.runmd: {e.message}", EXIT_USAGE) from None
    try:
        atomic_write(path, text, make_folder=False)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror}") from None
    print(f"wrote {path}")
    return 0


def _q(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def dump(compiled: Compiled) -> str:
    """The numbered map of a runmd: blocks, roots and steps with their ids and inputs."""
    lines = [f"# {compiled.path}"]
    width = len(str(max(compiled.document.ids(), default=1)))
    for block in compiled.document.blocks:
        lines.append(f"block {_q(block.title)} (line {block.line})")
        for control in block.controls:
            lines.append(f"  {'':>{width}}  {control.name} .{control.type} {_q(control.value)}")
        for root in block.roots:
            lines.append(f"  {root.id:>{width}}: {root.kind}{' ' + _q(root.input) if root.input else ''}")
            depth = 1
            #: (line index, kind) of each route, and the routes a step under them answers
            routes: list[tuple[int, str]] = []
            answered: set[int] = set()
            for step in root.steps:
                cls = compiled.classes[step.id]
                if getattr(cls, "route_kind", ""):
                    depth = 1
                    routes.append((len(lines), step.plugin))
                elif routes and routes[-1][1] in getattr(cls, "answers", ()):
                    answered.add(routes[-1][0])
                text = f"  {step.id:>{width}}: {'  ' * depth}{step.plugin}"
                if step.input:
                    text += f" {_q(step.input)}"
                lines.append(text)
                for attr in step.attributes:
                    lines.append(f"  {'':>{width}}  {'  ' * (depth + 1)}.{attr.name} {_q(attr.input)}")
                if getattr(cls, "route_kind", ""):
                    depth = 2
            for i, _ in routes:
                if i not in answered:
                    lines[i] += "  # no step answers: forwarded to the upstream as is"
    return "\n".join(lines)


def cmd_dump(args: argparse.Namespace) -> int:
    print(dump(load(args.runmd)))
    return 0


def load(path: str) -> Compiled:
    try:
        return _catalog().load(path)
    except RunmdError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def listen_address(compiled: Compiled, allow_remote: bool) -> Address:
    roots = list(compiled.document.roots("proxy"))
    if not roots:
        raise CliError(f"{compiled.path}: no '+ .proxy ADDR' block: nothing to serve", EXIT_USAGE)
    address: Address = compiled.config(roots[0])
    if not address.loopback:
        if not allow_remote:
            raise CliError(
                f"{compiled.path}:{roots[0].line}: '{address}' is not a loopback address; whoever reaches "
                "the mirror pulls with this node's credentials: pass --allow-remote if you mean it",
                EXIT_USAGE,
            )
        logger.warning("listening on %s: every client that reaches it pulls with this node's credentials", address)
    return address


def cmd_mirror_start(args: argparse.Namespace) -> int:
    compiled = load(args.runmd)
    engine = select_engine(compiled, args.engine_name)
    if engine is not None:
        return run_engine(compiled, engine, args)
    address = listen_address(compiled, args.allow_remote)
    start_id = args.id or 0
    if start_id:
        try:
            compiled.step(start_id)
        except KeyError as e:
            raise CliError(str(e.args[0]), EXIT_USAGE) from None
    check_listen(address)
    runtime = Runtime.for_document(compiled, Path(args.hosts_dir) if args.hosts_dir else None)
    try:
        ran = runtime.run(start_id)
    except StepError as e:
        raise CliError(str(e)) from None
    logger.info("%d runtime step(s) ran; serving on %s", ran, address)
    from addons.core.mitm.loop import run

    return run(serve(compiled, address, args))


# `+ .engine`, `acr mirror serve`, `acr containerd configure`


def select_engine(compiled: Compiled, name: str | None) -> "EngineSpec | None":
    """The engine `acr mirror start` runs, or None for a file without one (runtime, then serve)."""
    from addons.runmd import engine

    try:
        return engine.select(compiled, name)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def run_engine(compiled: Compiled, spec: "EngineSpec", args: argparse.Namespace) -> int:
    """Run the engine's events; its proxy is a supervised `acr mirror serve` child."""
    from addons.runmd import engine

    start_id = args.id or 0
    if start_id:
        try:
            compiled.step(start_id)
            engine.start_point(spec, start_id)
        except KeyError as e:
            raise CliError(str(e.args[0]), EXIT_USAGE) from None
        except ValueError as e:
            raise CliError(str(e), EXIT_USAGE) from None
    if spec.proxies():
        check_listen(listen_address(compiled, args.allow_remote))
    serve_argv = [sys.executable, "-m", "addons.cli", "--runmd", str(Path(compiled.path).resolve())]
    serve_argv += ["-v"] if args.verbose else []
    serve_argv += ["mirror", "serve"] + (["--allow-remote"] if args.allow_remote else [])
    if getattr(args, "web", False):  # the proxy child runs mitmweb
        check_listen(Address("127.0.0.1", args.web_port), "mitmweb")
        serve_argv += ["--web", "--web-port", str(args.web_port)]
    if any(True for _ in compiled.document.steps("host")):  # the proxy keeps the mirror in hosts.toml
        serve_argv += ["--set", f"acr_hosts_dir={hosts_dir_of(args)}"]
    for option in args.set or ():
        serve_argv += ["--set", option]
    runtime = Runtime.for_document(compiled, Path(args.hosts_dir) if args.hosts_dir else None)
    try:
        return engine.Engine(spec, runtime, serve_argv).run(start_id)
    except (StepError, engine.EngineError) as e:
        raise CliError(str(e)) from None


def cmd_mirror_serve(args: argparse.Namespace) -> int:
    """Serve the proxy only, no runtime step: what an engine runs and restarts."""
    compiled = load(args.runmd)
    address = listen_address(compiled, args.allow_remote)
    check_listen(address)
    from addons.core.mitm.loop import run

    return run(serve(compiled, address, args))


def cmd_containerd_configure(args: argparse.Namespace) -> int:
    from addons.node import containerd_config

    path = Path(args.config)
    try:
        edit, backup = containerd_config.configure(
            path, hosts_dir=args.hosts_dir, snapshotter=args.snapshotter, dry_run=args.dry_run
        )
    except containerd_config.ConfigError as e:
        raise CliError(str(e)) from None
    for line in containerd_config.report(path, edit, backup, args.dry_run):
        print(line)
    return 0


def cmd_overlaybd_configure(args: argparse.Namespace) -> int:
    """Point overlaybd's credential lookup at this mirror's `/auth` (the runmd's `+ .proxy`)."""
    from addons.node import containerd_config, overlaybd_config

    url = overlaybd_config.auth_url(load(args.runmd))
    if url is None:
        raise CliError(f"{args.runmd}: no '+ .proxy ADDR' block: no /auth for overlaybd to ask", EXIT_USAGE)
    path = Path(args.config)
    try:
        edit, backup = overlaybd_config.configure(path, url, dry_run=args.dry_run)
    except containerd_config.ConfigError as e:
        raise CliError(str(e)) from None
    for line in overlaybd_config.report(path, edit, backup, args.dry_run):
        print(line)
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from addons.node import service

    unit_dir = Path(args.unit_dir)
    try:
        if args.service_command == "install":
            home = Path(args.home) if args.home else Path(args.runmd).resolve().parent
            lines = service.install(home, unit_dir, _catalog().load, args.name, dry_run=args.dry_run, enable=args.enable)
        else:
            lines = service.uninstall(unit_dir, args.name, dry_run=args.dry_run, disable=args.disable)
    except service.ServiceError as e:
        raise CliError(str(e)) from None
    for line in lines:
        print(line)
    return 0


def add_web_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--web", action="store_true", help="run mitmweb (on loopback) instead of mitmdump, to watch flows")
    p.add_argument("--web-port", type=int, default=DEFAULT_WEB_PORT, help=f"mitmweb's port (default: {DEFAULT_WEB_PORT})")


def add_service_parser(sub) -> None:
    from addons.node.service import DEFAULT_NAME, DEFAULT_UNIT_DIR

    svc = sub.add_parser("service", help="run the mirror as a systemd service")
    svc_sub = svc.add_subparsers(dest="service_command", metavar="COMMAND", required=True)
    install = svc_sub.add_parser("install", help="write the systemd unit that runs 'acr mirror start' in a home folder")
    install.add_argument("--home", help="the folder with mirror.runmd (default: the folder of --runmd)")
    install.add_argument("--enable", action="store_true", help="also run systemctl daemon-reload and enable --now")
    uninstall = svc_sub.add_parser("uninstall", help="remove the systemd unit")
    uninstall.add_argument("--disable", action="store_true", help="first run systemctl disable --now")
    for p in (install, uninstall):
        p.add_argument("--unit-dir", default=str(DEFAULT_UNIT_DIR), help=f"default: {DEFAULT_UNIT_DIR}")
        p.add_argument("--name", default=DEFAULT_NAME, help=f"the unit's name (default: {DEFAULT_NAME})")
        p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
        p.set_defaults(func=cmd_service)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) like every other error of `acr`."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"acr: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="acr", description="lifec-registry: a registry mirror for containerd")
    parser.add_argument("--version", action="version", version=f"acr {__version__}")
    parser.add_argument("--runmd", default="mirror.runmd", help="the runmd file (default: ./mirror.runmd)")
    parser.add_argument("--registry", help="the ACR registry name, e.g. example for example.azurecr.io")
    parser.add_argument("--registry-host", default="azurecr.io", help="the registry's domain (default: azurecr.io)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = sub.add_parser("init", help="write ./mirror.runmd from the template")
    init.add_argument("--mirror-address", default="localhost:8578", help="where the mirror listens (default: localhost:8578)")
    init.add_argument("--upstream", help="serve this registry URL instead of ACR, e.g. http://127.0.0.1:5000")
    init.add_argument("--teleport-format", default="overlaybd",
                      help="the streamable formats, in order of preference: overlaybd, estargz or both "
                           "(default: overlaybd)")
    init.add_argument("--artifact-type", action="append", help="a referrer artifact type to discover (repeatable)")
    init.add_argument("--force", action="store_true", help="overwrite an existing mirror.runmd")
    init.set_defaults(func=cmd_init)

    dump_p = sub.add_parser("dump", help="print the numbered steps of mirror.runmd")
    dump_p.set_defaults(func=cmd_dump)

    mirror = sub.add_parser("mirror", help="run the mirror")
    mirror_sub = mirror.add_subparsers(dest="mirror_command", metavar="COMMAND", required=True)
    start = mirror_sub.add_parser("start", help="run the runtime steps, then serve until SIGINT/SIGTERM")
    start.add_argument("--id", type=int, default=0, help="start at step N (see 'acr dump')")
    start.add_argument("--hosts-dir", help="containerd's hosts folder (default: /etc/containerd/certs.d)")
    start.add_argument("--allow-remote", action="store_true", help="allow a non-loopback listen address")
    start.add_argument("--set", action="append", metavar="OPTION=VALUE", help="set a mitmproxy or acr_ option")
    start.add_argument("--engine-name", help="the engine to run when the file has several ('``` NAME' of its block)")
    add_web_arguments(start)
    start.set_defaults(func=cmd_mirror_start)
    serve_p = mirror_sub.add_parser("serve", help="serve the proxy only, no runtime steps (what an engine supervises)")
    serve_p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback listen address")
    serve_p.add_argument("--set", action="append", metavar="OPTION=VALUE", help="set a mitmproxy or acr_ option")
    add_web_arguments(serve_p)
    serve_p.set_defaults(func=cmd_mirror_serve)
    add_service_parser(sub)

    # containerd's own config.toml
    containerd = sub.add_parser("containerd", help="containerd's own configuration")
    containerd_sub = containerd.add_subparsers(dest="containerd_command", metavar="COMMAND", required=True)
    configure = containerd_sub.add_parser(
        "configure", help="point containerd's CRI config_path at the hosts folder (edits config.toml, keeps a backup)"
    )
    configure.add_argument("--config", default="/etc/containerd/config.toml", help="default: /etc/containerd/config.toml")
    configure.add_argument(
        "--hosts-dir", help="the hosts folder (default: keep a config_path already set, else /etc/containerd/certs.d)"
    )
    configure.add_argument("--snapshotter", choices=("overlaybd", "stargz"),
                           help="also declare this streaming snapshotter and make it CRI's")
    configure.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    configure.set_defaults(func=cmd_containerd_configure)

    overlaybd = sub.add_parser("overlaybd", help="overlaybd's own configuration (what streams teleported images)")
    overlaybd_sub = overlaybd.add_subparsers(dest="overlaybd_command", metavar="COMMAND", required=True)
    obd_configure = overlaybd_sub.add_parser(
        "configure", help="make overlaybd ask this mirror's /auth for registry credentials (edits overlaybd.json, keeps a backup)"
    )
    obd_configure.add_argument("--config", default="/etc/overlaybd/overlaybd.json", help="default: /etc/overlaybd/overlaybd.json")
    obd_configure.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    obd_configure.set_defaults(func=cmd_overlaybd_configure)

    # containerd's hosts.toml files the runmd asks for
    hosts = sub.add_parser("hosts", help="show, install or remove the hosts.toml files for containerd")
    hosts.add_argument("hosts_command", choices=("show", "install", "remove"), metavar="{show,install,remove}")
    hosts.add_argument("--hosts-dir", help="containerd's hosts folder (default: /etc/containerd/certs.d)")
    hosts.add_argument(
        "--registries-conf", action="store_true",
        help="with show: print the registries.conf.d drop-in for podman, skopeo and CRI-O instead",
    )
    hosts.set_defaults(func=cmd_hosts)
    return parser


def cmd_hosts(args: argparse.Namespace) -> int:
    """`acr hosts show|install|remove` (see addons.node.hostsfile)."""
    from addons.node import hostsfile

    compiled = load(args.runmd)
    hosts_dir = hosts_dir_of(args)
    work = compiled.home / ".work"
    try:
        if args.hosts_command == "show" and args.registries_conf:
            print(hostsfile.registries_conf(compiled, work))
            return 0
        if args.hosts_command == "show":
            print(hostsfile.show(compiled, work, hosts_dir))
            return 0
        action = hostsfile.install_all if args.hosts_command == "install" else hostsfile.remove_all
        lines = action(compiled, work, hosts_dir)
    except hostsfile.HostsError as e:
        raise CliError(str(e)) from None
    for line in lines or [f"{compiled.path}: no '.host' step, so no hosts.toml"]:
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under systemd or a supervisor stdout is a pipe: one line per request must arrive as it happens.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (CliError, ServeError) as e:
        print(f"acr: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
