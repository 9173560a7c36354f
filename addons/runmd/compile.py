"""A runmd document checked against the plugins: every root and step matched and its input parsed.

Parsing (addons.runmd.syntax) knows the syntax; this module knows where a plugin may stand
and whether its input makes sense. Both errors carry the file and the line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.runmd.plugin import Plugin
from addons.runmd.syntax import Document, Root, RunmdError, Step

#: root kind -> {plugin name -> class}
PluginTable = Mapping[str, Mapping[str, type[Plugin]]]


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


def compile_document(doc: Document, table: PluginTable, root_table: Mapping[str, type[Plugin]]) -> Compiled:
    """Match every root and step to its plugin and parse its input, or raise RunmdError.

    The plugin table comes from above (addons.catalog): this layer knows what a plugin is,
    not which plugins exist.
    """
    out = Compiled(document=doc)
    proxies = 0
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
            if root.kind == "proxy":
                if getattr(cls, "route_kind", None):
                    route = step
                elif route is None:
                    raise RunmdError(
                        doc.path, step.line, f"'.{step.plugin}' must follow a route: '.manifests', '.blobs' or '.tags'"
                    )
                elif route.plugin not in getattr(cls, "routes", ()):
                    allowed = ", ".join(f"'.{r}'" for r in sorted(getattr(cls, "routes", ())))
                    raise RunmdError(doc.path, step.line, f"'.{step.plugin}' does not belong under '.{route.plugin}' (only under {allowed})")
    return out
