"""The runmd language (DESIGN §2): what parses into which blocks, roots and steps, and the
one-line errors that name the file and the line.

Everything here goes through `catalog.parse_text`, the entry point the CLI and
`acr_addons.py` share, so a test that passes here describes what the mirror really reads.
"""

from __future__ import annotations

import re

import pytest

from addons import catalog
from addons.core.address import Address
from addons.cli import DEFAULT_ARTIFACT_TYPES, render_template
from addons.runmd.syntax import Control, RunmdError

PATH = "conf/mirror.runmd"

#: DESIGN §2's seed example, exactly as written there (an unnamed ``` fence around it).
SEED = """\
```
+ .runtime
: .login-acr    example
: .install      access_token
: .mirror       example.azurecr.io
: .host         localhost:8578, resolve, pull

+ .proxy          localhost:8578
: .manifests      head, get
:   .login        access_token
:   .authn        oauth2
:   .resolve      application/vnd.docker.distribution.manifest.list.v2+json
:   .discover     dadi.image.v1
:   .teleport     overlaybd
: .blobs          get
:   .login        access_token
:   .authn        oauth2
:   .pull
```
"""


def outline(compiled: catalog.Compiled) -> list[tuple[int, str, str, int]]:
    """(id, name, input, line) of every root and step, in document order."""
    out: list[tuple[int, str, str, int]] = []
    for root in compiled.document.roots():
        out.append((root.id, "+" + root.kind, root.input, root.line))
        out.extend((s.id, s.plugin, s.input, s.line) for s in root.steps)
    return out


def plugin_names(compiled: catalog.Compiled, kind: str) -> list[str]:
    return [s.plugin for r in compiled.document.roots(kind) for s in r.steps]


# --- what parses ----------------------------------------------------------------


def test_seed_example_parses_with_ids_inputs_and_lines() -> None:
    compiled = catalog.parse_text(SEED, PATH)
    assert compiled.path == PATH
    assert len(compiled.document.blocks) == 1
    assert outline(compiled) == [
        (1, "+runtime", "", 2),
        (2, "login-acr", "example", 3),
        (3, "install", "access_token", 4),
        (4, "mirror", "example.azurecr.io", 5),
        (5, "host", "localhost:8578, resolve, pull", 6),
        (6, "+proxy", "localhost:8578", 8),
        (7, "manifests", "head, get", 9),
        (8, "login", "access_token", 10),
        (9, "authn", "oauth2", 11),
        (10, "resolve", "application/vnd.docker.distribution.manifest.list.v2+json", 12),
        (11, "discover", "dadi.image.v1", 13),
        (12, "teleport", "overlaybd", 14),
        (13, "blobs", "get", 15),
        (14, "login", "access_token", 16),
        (15, "authn", "oauth2", 17),
        (16, "pull", "", 18),
    ]
    assert compiled.document.ids() == list(range(1, 17))


def test_seed_example_inputs_are_parsed_by_their_plugins() -> None:
    compiled = catalog.parse_text(SEED, PATH)
    by_id = {i: compiled.configs[i] for i in compiled.document.ids()}
    assert by_id[6] == Address("localhost", 8578)  # + .proxy
    assert by_id[7] == frozenset({"HEAD", "GET"})  # .manifests head, get
    assert by_id[13] == frozenset({"GET"})  # .blobs get
    host = by_id[5]
    assert host.address == Address("localhost", 8578)
    assert set(host.capabilities) == {"resolve", "pull"}
    upstream = by_id[4]
    assert upstream.base_url == "https://example.azurecr.io"
    assert upstream.ns == "example.azurecr.io"
    assert by_id[11] == ("dadi.image.v1",)
    # Every root and step is matched to a plugin class.
    assert set(compiled.classes) == set(compiled.document.ids())
    assert compiled.classes[8] is compiled.classes[14]  # .login under both routes


def _check_lines_point_at_their_text(text: str, compiled: catalog.Compiled) -> None:
    lines = text.splitlines()
    for root in compiled.document.roots():
        assert lines[root.line - 1].lstrip().startswith(f"+ .{root.kind}")
        for step in root.steps:
            assert re.match(rf"^\s*:\s*\.{re.escape(step.plugin)}(\s|$)", lines[step.line - 1]), (step, lines[step.line - 1])


def test_rendered_template_for_acr_parses() -> None:
    text = render_template(
        registry="example",
        registry_host="azurecr.io",
        mirror_address="localhost:8578",
        upstream=None,
        teleport_format="overlaybd",
        artifact_types=DEFAULT_ARTIFACT_TYPES,
    )
    compiled = catalog.parse_text(text, PATH)
    # The install event's node check runs first, then the start event's steps.
    assert plugin_names(compiled, "runtime") == ["node-check", "login-acr", "install", "mirror", "host"]
    assert plugin_names(compiled, "engine") == ["event", "event", "loop"]
    assert plugin_names(compiled, "proxy") == [
        "manifests", "login", "authn", "resolve", "discover", "teleport", "blobs", "login", "authn", "pull", "tags", "login", "authn", "pull",
    ]
    steps = {s.plugin: s for _, s in compiled.document.steps()}
    assert steps["login-acr"].input == "example"
    assert steps["mirror"].input == "example.azurecr.io"
    assert steps["host"].input == "localhost:8578, resolve, pull"
    assert steps["discover"].input == ", ".join(DEFAULT_ARTIFACT_TYPES)
    assert steps["teleport"].input == "overlaybd, auto"
    (proxy,) = compiled.document.roots("proxy")
    assert proxy.input == "localhost:8578"
    _check_lines_point_at_their_text(text, compiled)


def test_rendered_template_with_upstream_parses_without_acr_login() -> None:
    text = render_template(
        registry=None,
        registry_host="azurecr.io",
        mirror_address="127.0.0.1:9000",
        upstream="http://127.0.0.1:5000",
        teleport_format="overlaybd",
        artifact_types=["dadi.image.v1"],
    )
    compiled = catalog.parse_text(text, PATH)
    runtime = plugin_names(compiled, "runtime")
    assert "login-acr" not in runtime
    assert runtime[-2:] == ["mirror", "host"]
    steps = {s.plugin: s for _, s in compiled.document.steps()}
    assert steps["mirror"].input == "http://127.0.0.1:5000"
    assert compiled.config(steps["mirror"]).base_url == "http://127.0.0.1:5000"
    assert steps["discover"].input == "dadi.image.v1"
    assert [r.input for r in compiled.document.roots("proxy")] == ["127.0.0.1:9000"]
    _check_lines_point_at_their_text(text, compiled)


def test_comments_inline_text_and_cosmetic_indentation() -> None:
    text = """\
Prose with + .runtime and : .mirror x that is not inside a fence.

``` start mirror
# a hash comment
// a slash comment
- a dash comment: .frobnicate
* a star comment
    # an indented comment
<just a note>
+ .runtime <runs once>
:    .mirror     <the registry> example.azurecr.io   
      :   .host  localhost:8578, resolve, pull
+ .proxy <where it listens> localhost:8578
: .manifests head, get <methods>
:          .login    access_token
```
"""
    compiled = catalog.parse_text(text, PATH)
    assert outline(compiled) == [
        (1, "+runtime", "", 10),
        (2, "mirror", "example.azurecr.io", 11),
        (3, "host", "localhost:8578, resolve, pull", 12),
        (4, "+proxy", "localhost:8578", 13),
        (5, "manifests", "head, get", 14),
        (6, "login", "access_token", 15),
    ]
    block = compiled.document.blocks[0]
    assert (block.name, block.symbol, block.line) == ("start", "mirror", 3)


def test_block_control_values_before_any_root() -> None:
    text = """\
``` start mirror
: work_dir .symbol .world/x
:   retries   .int   3
+ .runtime
: .mirror example.azurecr.io
```
"""
    compiled = catalog.parse_text(text, PATH)
    block = compiled.document.blocks[0]
    assert block.controls == [
        Control(name="work_dir", type="symbol", value=".world/x", line=2),
        Control(name="retries", type="int", value="3", line=3),
    ]
    # Control values are not steps: numbering starts at the root.
    assert outline(compiled) == [(1, "+runtime", "", 4), (2, "mirror", "example.azurecr.io", 5)]


def test_fence_info_runmd_alone_is_not_a_block_name() -> None:
    text = "```runmd\n+ .runtime\n: .mirror example.azurecr.io\n```\n\n``` runmd\n+ .engine\n```\n"
    compiled = catalog.parse_text(text, PATH)
    assert [(b.name, b.symbol, b.line) for b in compiled.document.blocks] == [("", "", 1), ("", "", 6)]
    assert outline(compiled) == [(1, "+runtime", "", 2), (2, "mirror", "example.azurecr.io", 3), (3, "+engine", "", 7)]


def test_fence_name_and_symbol() -> None:
    compiled = catalog.parse_text("``` start mirror\n+ .runtime\n```\n", PATH)
    block = compiled.document.blocks[0]
    assert (block.name, block.symbol, block.title) == ("start", "mirror", "start mirror")


def test_documentation_fences_are_skipped() -> None:
    text = """\
Install it:

```sh
acr --registry example init
: .frobnicate this would be an error inside a runmd block
```

```toml
server = "https://example.azurecr.io"
[host."http://localhost:8578"]
```

``` start mirror
+ .runtime
: .mirror example.azurecr.io
```

```bash
+ .nonsense
```
"""
    compiled = catalog.parse_text(text, PATH)
    assert [(b.title, b.line) for b in compiled.document.blocks] == [("start mirror", 13)]
    assert outline(compiled) == [(1, "+runtime", "", 14), (2, "mirror", "example.azurecr.io", 15)]


def test_load_reads_a_file(tmp_path) -> None:
    path = tmp_path / "mirror.runmd"
    path.write_text(SEED)
    compiled = catalog.load(path)
    assert compiled.path == str(path)
    assert compiled.home == tmp_path.resolve()
    assert len(compiled.document.ids()) == 16


def test_load_of_a_missing_file_is_a_runmd_error(tmp_path) -> None:
    path = tmp_path / "nope.runmd"
    with pytest.raises(RunmdError) as info:
        catalog.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


# --- one-line errors naming file and line -------------------------------------

RUNTIME = "``` start mirror\n+ .runtime\n: .mirror example.azurecr.io\n"  # lines 1-3


def expect_error(text: str, line: int, *fragments: str) -> str:
    with pytest.raises(RunmdError) as info:
        catalog.parse_text(text, PATH)
    message = str(info.value)
    assert message.startswith(f"{PATH}:{line}: "), message
    assert "\n" not in message and "\r" not in message, message
    assert info.value.line == line
    assert info.value.path == PATH
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_error_unclosed_fence_names_the_opening_line() -> None:
    text = "# Title\n\nsome prose\n\n``` start mirror\n+ .runtime\n: .mirror example.azurecr.io\n\n# the end\n"
    expect_error(text, 5, "unclosed", "```")


def test_error_step_before_any_root() -> None:
    expect_error("text\n```\n: .mirror example.azurecr.io\n```\n", 3, ".mirror", "+ .runtime")


def test_error_unknown_plugin_lists_known_ones() -> None:
    message = expect_error(RUNTIME + ": .frobnicate now\n```\n", 4, ".frobnicate")
    for known in ("login-acr", "install", "mirror", "host"):
        assert known in message


def test_error_unknown_plugin_under_proxy_lists_proxy_plugins() -> None:
    message = expect_error(RUNTIME + "+ .proxy localhost:8578\n: .manifests get\n:   .fetch\n```\n", 6, ".fetch")
    for known in ("manifests", "blobs", "tags", "login", "authn", "resolve", "discover", "teleport", "pull"):
        assert known in message


def test_error_unknown_root() -> None:
    message = expect_error("```\n+ .server localhost:8578\n```\n", 2, ".server")
    for known in ("runtime", "proxy", "engine"):
        assert known in message


def test_error_host_without_address() -> None:
    expect_error(RUNTIME + ": .host\n```\n", 4, ".host")


def test_error_host_with_capabilities_but_no_address() -> None:
    expect_error(RUNTIME + ": .host resolve, pull\n```\n", 4, ".host")


def test_error_manifests_with_unknown_method() -> None:
    expect_error(RUNTIME + "+ .proxy localhost:8578\n: .manifests head, post\n```\n", 5, ".manifests", "post")


def test_error_proxy_with_bad_port() -> None:
    expect_error(RUNTIME + "+ .proxy localhost:99999\n: .manifests get\n```\n", 4, ".proxy", "99999")


def test_error_proxy_without_port() -> None:
    expect_error(RUNTIME + "+ .proxy localhost\n: .manifests get\n```\n", 4, ".proxy")


def test_error_plugin_under_the_wrong_route() -> None:
    text = RUNTIME + "+ .proxy localhost:8578\n: .manifests get\n: .blobs get\n:   .resolve\n```\n"
    expect_error(text, 7, ".resolve", ".blobs")


def test_error_proxy_step_before_any_route() -> None:
    text = RUNTIME + "+ .proxy localhost:8578\n:   .login access_token\n: .manifests get\n```\n"
    expect_error(text, 5, ".login", "route")


def test_error_second_proxy() -> None:
    text = RUNTIME + "+ .proxy localhost:8578\n: .manifests get\n```\n\n```\n+ .proxy localhost:8579\n: .blobs get\n```\n"
    expect_error(text, 9, "+ .proxy")


def test_error_second_proxy_in_the_same_block() -> None:
    text = RUNTIME + "+ .proxy localhost:8578\n: .manifests get\n+ .proxy localhost:8579\n```\n"
    expect_error(text, 6, "+ .proxy")


def test_error_fence_with_info_inside_a_block() -> None:
    expect_error("``` start mirror\n+ .runtime\n```sh\n```\n", 3, "close", "line 1")


def test_error_control_value_after_a_root() -> None:
    expect_error(RUNTIME + ": work_dir .symbol .world/x\n```\n", 4, "work_dir")


def test_error_line_numbers_count_only_newlines() -> None:
    # Line 3 is a comment that contains a form feed; the unknown plugin is on line 4.
    text = "```\n+ .runtime\n# page one\x0c# page two\n: .frobnicate\n```\n"
    expect_error(text, 4, ".frobnicate")
