"""The package's layers: what README's "Where things are" says is what the code does.

Each folder of addons/ is a layer; a module imports only from its own layer and the layers below
(listed before it in README), and the import graph has no cycle, also not through imports made
for type checking only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADDONS = ROOT / "addons"
#: Layer order, lowest first; `proxy` and `node` stand side by side and never import each other.
LAYERS = {"core": 0, "registry": 1, "runmd": 2, "proxy": 3, "node": 3, "teleport": 4, "observe": 5, "": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ADDONS.rglob("*.py"):
        mod = module_name(path)
        out = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("addons"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    as_module = ROOT / (sub.replace(".", "/") + ".py")
                    out.add(sub if as_module.exists() else node.module)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("addons."))
        out.discard("addons")
    return graph


def test_every_import_goes_to_the_same_layer_or_one_below() -> None:
    wrong = []
    for mod, targets in imports().items():
        for target in targets:
            a, b = LAYERS[layer(mod)], LAYERS[layer(target)]
            if b > a or (b == a and layer(mod) != layer(target)):
                wrong.append(f"{mod} -> {target}")
    assert wrong == []


def test_there_is_no_import_cycle() -> None:
    graph = imports()
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def where_things_are() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Where things are"):]


def test_the_readme_names_every_layer_and_module_and_nothing_else() -> None:
    section = where_things_are()
    block = section[section.index("```text"):section.index("```", section.index("```text") + 3)]
    for folder in sorted(p for p in ADDONS.iterdir() if p.is_dir() and not p.name.startswith("__")):
        assert f"  {folder.name}/" in block, folder.name
        for module in sorted(folder.glob("*.py")):
            if module.stem != "__init__":
                assert re.search(rf"\b{module.stem}\b", block), f"{folder.name}/{module.name}"
    for top in sorted(ADDONS.glob("*.py")):
        if top.stem != "__init__":
            assert f"{top.name}" in block, top.name
    assert set(re.findall(r"^  (\w+)/", block, re.M)) == {
        p.name for p in ADDONS.iterdir() if p.is_dir() and not p.name.startswith("__")
    }


def test_the_tag_pull_walk_names_modules_and_functions_that_exist() -> None:
    walk = where_things_are().split("One tag pull", 1)[1]
    for path in re.findall(r"`((?:\w+/)+\w+\.py)`", walk):
        assert (ADDONS / path).is_file(), path
    for cls, method in re.findall(r"`([A-Z]\w+)\.(\w+)`", walk):
        found = [p for p in ADDONS.rglob("*.py") if re.search(rf"class {cls}\b[\s\S]*?def {method}\b", p.read_text())]
        assert found, f"{cls}.{method}"
