"""The mitmproxy script: `mitmdump -s "$(acr addon-path)" --set acr_runmd=mirror.runmd`.

It ships inside the package, so an installed node has it where `acr addon-path` says (the
repository's top-level acr_addons.py is a link to it). It builds the addon chain from the runmd,
in runmd order, exactly as `acr mirror start` does. Run it in reverse mode with
`--set connection_strategy=lazy`, e.g.
`mitmdump -s "$(acr addon-path)" --mode reverse:http://127.0.0.1:9@127.0.0.1:8578
--set connection_strategy=lazy --set acr_runmd=mirror.runmd`.
"""

from addons.chain import AcrMirror
from addons.core.mitm.loop import ReadSize

addons = [AcrMirror(), ReadSize()]
