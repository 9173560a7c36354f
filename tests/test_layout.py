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


#: Where an entry's description starts in the "Where things are" block.
TEXT_COLUMN = 25


def entries() -> dict[str, dict[str, str]]:
    """The block's entries: {top-level entry: {its own text under "", each indented entry: its text}},
    continuation lines joined."""
    section = where_things_are()
    start = section.index("```text\n") + len("```text\n")
    block = section[start:section.index("```", start)]
    out: dict[str, dict[str, str]] = {}
    top = sub = ""
    for line in block.splitlines():
        head, text = line[:TEXT_COLUMN], line[TEXT_COLUMN:].strip()
        if head.strip() and not head.startswith(" "):
            top, sub = head.strip(), ""
            out[top] = {"": text}
        elif head.strip():
            sub = head.strip()
            out[top][sub] = text
        else:
            out[top][sub] += f" {text}"
    return out


def listed(name: str, text: str) -> bool:
    """Whether `name` is an item of the entry's list (`a, b (what b is); c`), not a word of its prose."""
    return re.search(rf"(?:^|[,;:(+]\s*){re.escape(name)}(?=\s*[,;:()]|\s*$)", text) is not None


def test_the_readme_names_every_layer_and_module_and_nothing_else() -> None:
    tree = entries()
    layers = {k for k in tree["addons/"] if k.endswith("/")}
    assert layers == {f"{p.name}/" for p in ADDONS.iterdir() if p.is_dir() and not p.name.startswith("__")}
    for folder in sorted(p for p in ADDONS.iterdir() if p.is_dir() and not p.name.startswith("__")):
        text = tree["addons/"][f"{folder.name}/"]
        for module in sorted(folder.rglob("*.py")):
            package = module.parent.relative_to(folder)
            if package.parts:
                assert listed(f"{package}/", text), f"{folder.name}/{package}/"
            if module.stem != "__init__":
                assert listed(module.stem, text), f"{folder.name}/{module.relative_to(folder)}"
    # The package's own modules: entries of their own, or items of such an entry.
    top = {k: v for k, v in tree["addons/"].items() if k and not k.endswith("/")}
    for module in sorted(ADDONS.glob("*.py")):
        if module.stem != "__init__":
            assert module.name in top or any(listed(module.name, v) for v in top.values()), module.name


def test_the_readme_names_every_script_and_the_test_folders() -> None:
    tree = entries()
    text = tree["scripts/"][""]
    for path in sorted((ROOT / "scripts").iterdir()):
        assert listed(f"{path.name}/" if path.is_dir() else path.name, text), path.name
    for path in sorted((ROOT / "scripts" / "deploy").iterdir()):
        assert listed(path.name, text), f"deploy/{path.name}"
    assert {k for k in tree["tests/"] if k} == {"harness/", "stargz/", "golden/", "replay/"}
    for module in sorted((ROOT / "tests" / "harness").glob("*.py")):
        if module.stem != "__init__":
            assert listed(module.stem, tree["tests/"]["harness/"]), f"tests/harness/{module.name}"


def test_the_tag_pull_walk_names_modules_and_functions_that_exist() -> None:
    walk = where_things_are().split("One tag pull", 1)[1]
    for path in re.findall(r"`((?:\w+/)+\w+\.py)`", walk):
        assert (ADDONS / path).is_file(), path
    for cls, method in re.findall(r"`([A-Z]\w+)\.(\w+)`", walk):
        found = [p for p in ADDONS.rglob("*.py") if re.search(rf"class {cls}\b[\s\S]*?def {method}\b", p.read_text())]
        assert found, f"{cls}.{method}"
