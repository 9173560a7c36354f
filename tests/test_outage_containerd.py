"""A registry outage as containerd sees it: real containerd pulls through `acr mirror start` from
a real registry that the test stops (the outage) and starts again, on a node that streams (one
image is teleported, found through the tag schema: docker-registry has no referrers API).

containerd resolves the tag on every pull (the `imagePullPolicy: Always` case); the image
record is removed before each pull again, and the content kept (labelled as a GC root), so the
pull must resolve the tag and can only succeed from what is on the node.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import HostsDir
from tests.harness.containerd import Ctr
from tests.harness.images import make_image, push_image
from tests.harness.mirror import Mirror
from tests.harness.overlaybd import StreamingNode
from tests.harness.registry import Registry
from tests.test_teleport import (PLACEHOLDER_UPSTREAM, init_runmd, node_sets, pull, push_streamable,  # noqa: F401
                                 streamable, streaming_node)

START = 60.0


@pytest.mark.e2e
def test_containerd_pulls_tags_it_saw_while_the_registry_is_down_and_after_a_mirror_restart(
    containerd: Ctr, registry_factory: Callable[..., Registry], tmp_hosts_dir: HostsDir, repo_name: str,
    tmp_path: Path, mirror_factory: Callable[..., Mirror], init_runmd: str, streaming_node: StreamingNode,
) -> None:
    reg = registry_factory()
    images = {part: make_image({f"{part}.txt": f"{repo_name} {part}".encode()}) for part in "abc"}
    fast = streamable(f"fast {repo_name}")

    def push(parts: str) -> dict[str, str]:
        for part in parts:
            push_image(reg, f"{repo_name}-{part}", "v1", images[part])
        wanted = {f"{reg.host}/{repo_name}-{part}:v1": images[part].digest for part in parts}
        if "c" in parts:  # the registry has no referrers API: the tag schema links the streamable copy
            wanted[f"{reg.host}/{repo_name}-c:v1"] = push_streamable(reg, f"{repo_name}-c", images["c"], fast)
        return wanted

    wanted = push("abc")
    teleported = wanted[f"{reg.host}/{repo_name}-c:v1"]
    assert teleported != images["c"].digest
    m = mirror_factory(reg.url, runmd=init_runmd.replace(PLACEHOLDER_UPSTREAM, reg.url),
                       sets=node_sets(streaming_node), args=["--hosts-dir", str(tmp_path / "runtime-certs.d")],
                       start=False)
    m.start(timeout=START)
    tmp_hosts_dir.write(reg.host, m.url)

    for ref, digest in wanted.items():
        assert pull(containerd, tmp_hosts_dir, ref) == digest
    for digest in containerd.content_digests():
        containerd.ctr("content", "label", digest, "containerd.io/gc.root=outage-test", check=True)

    def pull_again(refs: dict[str, str], when: str) -> None:
        for ref, digest in refs.items():
            assert containerd.remove_image(ref).returncode == 0
            assert pull(containerd, tmp_hosts_dir, ref) == digest, when

    def lines_since(mark: int) -> list[str]:
        return [line for line in m.log_text().splitlines()[mark:] if re.search(r"addons\.proxy\.tail: (HEAD|GET) ", line)]

    reg.stop()  # the registry is down: connections are refused
    mark = len(m.log_text().splitlines())
    pull_again(wanted, "registry down")
    never = containerd.pull(f"{reg.host}/{repo_name}-a:never", hosts_dir=tmp_hosts_dir)
    assert never.returncode != 0  # a tag never seen fails as it does today
    m.stop()
    m.start(timeout=START)
    pull_again(wanted, "registry down, mirror restarted")
    during = lines_since(mark)
    tags = [line for line in during if re.search(rf"manifests {re.escape(repo_name)}-[abc]:v1 -> 200", line)]
    assert len(tags) == 6 and all("(stale " in line and "upstream unreachable)" in line for line in tags), during
    # Nothing else was asked for: every byte was on the node.
    assert all(":never -> 502" in line or line in tags for line in during), during
    assert sum(f"teleported to {teleported}" in line for line in tags) == 2
    assert m.get("/status").json()["stale"]["answers"] == 3  # since the restart

    # The registry is back (its storage lost): a tag pushed again is fresh, a tag gone is 404.
    reg = registry_factory(port=reg.port, workdir=reg.dir)
    back = push("ac")
    mark = len(m.log_text().splitlines())
    pull_again(back, "registry back")
    gone = f"{reg.host}/{repo_name}-b:v1"
    assert containerd.remove_image(gone).returncode == 0
    assert containerd.pull(gone, hosts_dir=tmp_hosts_dir).returncode != 0
    after = lines_since(mark)
    fresh = [line for line in after if re.search(r"manifests \S+-[ac]:v1 -> 200", line)]
    assert len(fresh) == 2 and not any("stale" in line for line in after), after
    assert any(re.search(rf"manifests {re.escape(repo_name)}-b:v1 -> 404", line) for line in after), after
