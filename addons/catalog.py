"""The known plugins: the one list of every plugin class, and loading a runmd file against it.

It sits on top of the layers (it imports every plugin module), so the runmd layer below
never imports the plugins it checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

from addons.node.containerd_config import ContainerdConfig
from addons.node.host import Host
from addons.node.https import Https
from addons.node.install import Install
from addons.node.login_acr import LoginAcr
from addons.node.mirror import Mirror
from addons.node.node_check import NodeCheck
from addons.node.server import Server
from addons.proxy.authn import Authn
from addons.proxy.front import Proxy
from addons.proxy.login import Login
from addons.proxy.pull import Pull
from addons.proxy.resolve import Resolve
from addons.proxy.routes import Blobs, Manifests, Tags
from addons.runmd import engine, syntax
from addons.runmd.compile import Compiled, compile_document
from addons.runmd.engine import Event, Exit, Loop
from addons.runmd.plugin import Plugin
from addons.runmd.process import Process
from addons.runmd.runtime import EngineRoot, RuntimeRoot
from addons.teleport.discover import Discover
from addons.teleport.teleport import Teleport

__all__ = ["Compiled", "attribute_names", "load", "parse_text", "plugins", "roots"]

#: Every plugin a runmd may name.
PLUGINS: tuple[type[Plugin], ...] = (
    LoginAcr, Install, Mirror, Host, Server, Https,
    Manifests, Blobs, Tags, Login, Authn, Resolve, Discover, Teleport, Pull,
    Process, ContainerdConfig, NodeCheck, Event, Loop, Exit,
)


@cache
def plugins() -> dict[str, dict[str, type[Plugin]]]:
    """root kind -> {plugin name -> class}."""
    table: dict[str, dict[str, type[Plugin]]] = {"runtime": {}, "proxy": {}, "engine": {}}
    for cls in PLUGINS:
        for root in cls.roots:
            table[root][cls.plugin] = cls
    return table


@cache
def roots() -> dict[str, type[Plugin]]:
    """root kind -> the class that reads the root's own input (`+ .proxy ADDR`)."""
    return {"runtime": RuntimeRoot, "proxy": Proxy, "engine": EngineRoot}


def attribute_names() -> Mapping[str, tuple[str, ...]]:
    return {name: cls.attributes for table in plugins().values() for name, cls in table.items()}


def compile_checked(doc: syntax.Document) -> Compiled:
    """Match the document to the plugins; a file whose engines cannot run does not load."""
    compiled = compile_document(doc, plugins(), roots())
    if any(doc.roots("engine")):
        engine.check(compiled)
    return compiled


def load(path: str | Path) -> Compiled:
    """Read, parse and check a runmd file."""
    return compile_checked(syntax.load(path, attribute_names()))


def parse_text(text: str, path: str = "<runmd>") -> Compiled:
    return compile_checked(syntax.parse(text, path, attribute_names()))
