"""mitmweb's own search-box filter, run with node over flows as mitmweb's page receives them.

mitmweb 11 filters in the browser: its filter grammar (a PEG parser) and the request helpers it
calls are part of the page's bundle, `mitmproxy/tools/web/static/app.js` in the installed wheel.
This module cuts exactly those pieces out of that file (no copy is kept in the repository, so a
mitmproxy upgrade is what is tested) and evaluates an expression with node over flow JSON from
`GET /flows` (or `mitmproxy.tools.web.app.flow_to_json`), the data the page filters.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import mitmproxy.tools.web

APP_JS = Path(mitmproxy.tools.web.__file__).parent / "static" / "app.js"

#: The pieces of the bundle, by their first and last characters (names as minified in 11.0.x).
_HELPERS = ('var sA={http:80,https:443},Rn=class e{', 'vl=class extends Rn{static{i(this,"ResponseUtils")}}')
_PARSER = ('var wf=function(){"use strict";', 'return i(n,"peg$parse"),{SyntaxError:t,parse:n}}();')

_RUNNER = """
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
let out;
try {
  const match = wf.parse(input.expr);
  out = {ok: true, ids: input.flows.filter(f => match(f)).map(f => f.id), desc: match.desc};
} catch (e) {
  out = {ok: false, error: String(e.message || e)};
}
process.stdout.write(JSON.stringify(out));
"""


class FilterSyntaxError(ValueError):
    """mitmweb's search box would show this expression as invalid."""


def _cut(text: str, first: str, last: str) -> str:
    start = text.find(first)
    end = text.find(last, start)
    if start < 0 or end < 0:
        raise RuntimeError(f"{APP_JS}: mitmweb's filter code not found ({first[:30]}...): the bundle changed")
    return text[start:end + len(last)]


@lru_cache(maxsize=1)
def script() -> str:
    """The filter code of the installed mitmweb, runnable by node."""
    text = APP_JS.read_text()
    head = 'var fv=Object.defineProperty;var i=(e,t)=>fv(e,"name",{value:t,configurable:!0});\n'
    return head + _cut(text, *_HELPERS) + ";\n" + _cut(text, *_PARSER) + "\n" + _RUNNER


def node() -> str:
    found = shutil.which("node") or shutil.which("nodejs")
    if found is None:
        raise RuntimeError("node is not installed (apt-get install nodejs)")
    return found


def matching(expr: str, flows: list[dict[str, Any]]) -> list[str]:
    """The ids of the flows mitmweb's search box keeps for `expr`, in order."""
    out = subprocess.run([node(), "-e", script()], input=json.dumps({"expr": expr, "flows": flows}),
                         capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    if not result["ok"]:
        raise FilterSyntaxError(f"{expr}: {result['error']}")
    return list(result["ids"])
