"""mitmproxy's `mirror:` mode: the log and mitmweb name the registries the mirror serves, and
flow files keep a mode that stock mitmproxy reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mitmproxy import io
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from mitmproxy.test import tflow

from addons.core import mirror_mode
from addons.core.mirror_mode import MirrorMode
from addons.observe.record import scrubbed_copy


def test_the_mode_names_every_upstream_and_targets_the_first() -> None:
    mode = ProxyMode.parse(mirror_mode.spec(["https://example.azurecr.io", "http://127.0.0.1:5000"], "127.0.0.1", 8578))
    assert isinstance(mode, MirrorMode) and isinstance(mode, ReverseMode)
    assert mode.description == "registry mirror of https://example.azurecr.io, http://127.0.0.1:5000"
    assert (mode.scheme, mode.address, mode.transport_protocol) == ("https", ("example.azurecr.io", 443), "tcp")
    assert (mode.listen_host(), mode.listen_port()) == ("127.0.0.1", 8578)


@pytest.mark.parametrize("spec, message", [("mirror:@127.0.0.1:1", "at least one upstream"),
                                           ("mirror:ftp://x@127.0.0.1:1", "scheme")])
def test_a_bad_mirror_mode_is_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProxyMode.parse(spec)


def test_flow_files_keep_a_mode_stock_mitmproxy_reads(tmp_path: Path) -> None:
    f = tflow.tflow(resp=True)
    f.client_conn.proxy_mode = ProxyMode.parse(mirror_mode.spec(["http://127.0.0.1:5000"], "127.0.0.1", 8578))
    path = tmp_path / "flows.mitm"
    with path.open("wb") as fo:
        io.FlowWriter(fo).add(scrubbed_copy(f))
    assert isinstance(f.client_conn.proxy_mode, MirrorMode)  # the flow itself is unchanged
    # A fresh interpreter that knows only mitmproxy, as `mitmweb -r` would be.
    script = ("import sys\nfrom mitmproxy import io\nwith open(sys.argv[1], 'rb') as fo:\n"
              "    (f,) = io.FlowReader(fo).stream()\nprint(f.client_conn.proxy_mode.full_spec)")
    read = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == "reverse:http://127.0.0.1:5000@127.0.0.1:8578"
