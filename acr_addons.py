"""The mitmproxy script: `mitmdump -s acr_addons.py --set acr_runmd=mirror.runmd`.

It builds the addon chain from the runmd, in runmd order, exactly as `acr mirror start`
does. Run it in reverse mode with `--set connection_strategy=lazy`, e.g.
`mitmdump -s acr_addons.py --mode reverse:http://127.0.0.1:9@127.0.0.1:8578
--set connection_strategy=lazy --set acr_runmd=mirror.runmd`.
"""

from addons.chain import AcrMirror
from addons.core.mitm.loop import ReadSize

addons = [AcrMirror(), ReadSize()]
