"""The known plugins, and the check of a parsed runmd document against them.

Parsing (addons.runmd) knows the syntax; this module knows what each name means, where it
may stand and whether its input makes sense. Both errors carry the file and the line.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from addons import runmd
from addons.plugin import Plugin, ProxyPlugin
from addons.runmd import Document, Root, RunmdError, Step

#: module name -> plugin class name; one module per plugin.
_PLUGIN_MODULES = {
    "login_acr": "LoginAcr",
    "install": "Install",
    "mirror": "Mirror",
    "host": "Host",
    "server": "Server",  # issue 5: hosts.toml
    "https": "Https",  # issue 5: hosts.toml
    "routes": ("Manifests", "Blobs", "Tags"),
    "login": "Login",
    "authn": "Authn",
    "resolve": "Resolve",
    "discover": "Discover",
    "teleport": "Teleport",
    "pull": "Pull",
    "process": "Process",  # issue 8: runtime
    "containerd_config": "ContainerdConfig",  # issue 8: runtime
    "node_check": "NodeCheck",  # issue 8: runtime
    "engine": ("Event", "Loop", "Exit"),  # issue 8: under '+ .engine'
}


@cache
def plugins() -> dict[str, dict[str, type[Plugin]]]:
    """root kind -> {plugin name -> class}."""
    table: dict[str, dict[str, type[Plugin]]] = {"runtime": {}, "proxy": {}, "engine": {}}
    for module, names in _PLUGIN_MODULES.items():
        mod = importlib.import_module(f"addons.{module}")
        for cls_name in (names,) if isinstance(names, str) else names:
            cls = getattr(mod, cls_name)
            for root in cls.roots:
                table[root][cls.plugin] = cls
    return table


@cache
def roots() -> dict[str, type[Plugin]]:
    """root kind -> the class that reads the root's own input (`+ .proxy ADDR`)."""
    from addons.proxy import Proxy
    from addons.runtime import RuntimeRoot, EngineRoot

    return {"runtime": RuntimeRoot, "proxy": Proxy, "engine": EngineRoot}


def attribute_names() -> Mapping[str, tuple[str, ...]]:
    return {name: cls.attributes for table in plugins().values() for name, cls in table.items()}


@dataclass
class Compiled:
    """A document whose every root and step has been matched to a plugin and its input parsed."""

    document: Document
    configs: dict[int, Any] = field(default_factory=dict)
    classes: dict[int, type[Plugin]] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.document.path

    @property
    def home(self) -> Path:
        """The folder of the runmd file: relative files in steps are read from there."""
        return Path(self.document.path).resolve().parent

    def config(self, item: Root | Step) -> Any:
        return self.configs[item.id]

    def step(self, step_id: int) -> tuple[Root, Step | None]:
        for root in self.document.roots():
            if root.id == step_id:
                return root, None
            for step in root.steps:
                if step.id == step_id:
                    return root, step
        ids = self.document.ids()
        span = f"{ids[0]}-{ids[-1]}" if ids else "none"
        raise KeyError(f"no step {step_id} in {self.path} (ids: {span})")


def _known(table: Mapping[str, Any]) -> str:
    return ", ".join(sorted(table))


def compile_document(doc: Document) -> Compiled:
    """Match every root and step to its plugin and parse its input, or raise RunmdError."""
    out = Compiled(document=doc)
    proxies = 0
    root_table = roots()
    table = plugins()
    for root in doc.roots():
        root_cls = root_table.get(root.kind)
        if root_cls is None:
            raise RunmdError(doc.path, root.line, f"unknown root '.{root.kind}' (known: {_known(root_table)})")
        try:
            out.configs[root.id] = root_cls.parse(root.input)
        except ValueError as e:
            raise RunmdError(doc.path, root.line, f"'+ .{root.kind}': {e}") from None
        out.classes[root.id] = root_cls
        if root.kind == "proxy":
            proxies += 1
            if proxies > 1:
                raise RunmdError(doc.path, root.line, "only one '+ .proxy' is allowed")
        route: Step | None = None
        for step in root.steps:
            cls = table[root.kind].get(step.plugin)
            if cls is None:
                raise RunmdError(
                    doc.path,
                    step.line,
                    f"unknown plugin '.{step.plugin}' under '+ .{root.kind}' (known: {_known(table[root.kind])})",
                )
            try:
                out.configs[step.id] = cls.parse(step.input)
            except ValueError as e:
                raise RunmdError(doc.path, step.line, f"'.{step.plugin}': {e}") from None
            for attr in step.attributes:
                try:
                    cls.parse_attribute(attr.name, attr.input)  # type: ignore[attr-defined]
                except ValueError as e:
                    raise RunmdError(doc.path, attr.line, f"'.{attr.name}': {e}") from None
            out.classes[step.id] = cls
            if root.kind == "proxy" and issubclass(cls, ProxyPlugin):
                if getattr(cls, "route_kind", None):
                    route = step
                elif route is None:
                    raise RunmdError(
                        doc.path, step.line, f"'.{step.plugin}' must follow a route: '.manifests', '.blobs' or '.tags'"
                    )
                elif route.plugin not in cls.routes:
                    allowed = ", ".join(f"'.{r}'" for r in sorted(cls.routes))
                    raise RunmdError(doc.path, step.line, f"'.{step.plugin}' does not belong under '.{route.plugin}' (only under {allowed})")
    if any(doc.roots("engine")):
        from addons.engine import check as check_engines

        check_engines(out)
    return out


def load(path: str | Path) -> Compiled:
    """Read, parse and check a runmd file."""
    return compile_document(runmd.load(path, attribute_names()))


def parse_text(text: str, path: str = "<runmd>") -> Compiled:
    return compile_document(runmd.parse(text, path, attribute_names()))
