"""The README's screenshot: a teleported pull in this project's mitmweb (docs/mitmweb-teleport.png).

Starts the recorded ACR session as the upstream (`mitmdump --server-replay`, tests/replay), the
mirror with `acr mirror start --web`, pulls the recorded tag through it (containerd when root,
else containerd's requests from an HTTP client), and photographs mitmweb with headless Chromium
with the teleported flow selected. Needs `chromium` (apt-get install chromium); the tests do not.

    .venv/bin/python scripts/web_screenshot.py [--out docs/mitmweb-teleport.png] [--tab comment]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.harness.mirror import Mirror  # noqa: E402
from tests.harness.ports import free_port, wait_port  # noqa: E402
from tests.harness.replay import (REPLAY_DIR, UPSTREAM_FLOWS, ReplayServer, http_pull, replay_runmd,  # noqa: E402
                                  session_info)

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mitmweb-teleport.png")
    parser.add_argument("--tab", default="comment", help="the flow detail tab to show (request, response, comment, ...)")
    parser.add_argument("--size", default="1800,560", help="window size WIDTH,HEIGHT")
    parser.add_argument("--client", choices=("auto", "containerd", "http"), default="auto")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    session = session_info()
    work = Path(tempfile.mkdtemp(prefix="lifec-shot-"))
    client = args.client
    if client == "auto":
        client = "containerd" if os.geteuid() == 0 and shutil.which("ctr") else "http"
    with ReplayServer(REPLAY_DIR / UPSTREAM_FLOWS, [session["registry_origin"], session["storage_origin"]],
                      work / "replay.log") as server:
        upstream = server.url(session["registry_origin"])
        ns = upstream.split("//", 1)[1]
        web_port = free_port()
        mirror = Mirror(work / "mirror", [], runmd=replay_runmd(upstream, "127.0.0.1:{port}"),
                        credentials="replay-refresh-token-not-a-secret",
                        sets=[f"acr_platform={session['platform']}"], args=["--web", "--web-port", str(web_port)])
        try:
            wait_port("127.0.0.1", web_port, 15)
            if client == "containerd":
                from tests.harness.containerd import Containerd, write_hosts_toml
                from tests.harness.ports import ClosedPort

                with ClosedPort() as closed, Containerd() as cd:
                    write_hosts_toml(work / "certs.d", ns, closed.url, hosts=[(mirror.url, ["pull", "resolve"])])
                    result = cd.pull(f"{ns}/{session['repository']}:{session['tag']}", hosts_dir=work / "certs.d",
                                     platform=session["platform"])
                    if result.returncode != 0:
                        raise SystemExit(result.stderr)
            else:
                pulled = http_pull(mirror.url, ns, session["repository"], session["tag"], session["platform"])
                if pulled.errors:
                    raise SystemExit(str(pulled.errors))
            web = f"http://127.0.0.1:{web_port}"
            flows = requests.get(web + "/flows", timeout=10).json()
            flow = next(f for f in flows if f["comment"].startswith("teleport "))
            url = f"{web}/#/flows/{flow['id']}/{args.tab}"
            args.out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'chromium'}",
                            f"--window-size={args.size}", "--virtual-time-budget=10000",
                            f"--screenshot={args.out}", url], check=True, capture_output=True, timeout=120)
        finally:
            mirror.stop()
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {flow['comment']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
