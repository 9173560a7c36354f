"""`mitmdump -s scripts/rehost.py --set acr_rehost=FROM=TO,...`: rewrite origins in answers.

The replay server (`mitmdump --server-replay`) and the recording proxy of scripts/record load it:
see `addons.observe.replay.Rehost`. (A script of its own because mitmproxy's script loader cannot load a
module with dataclasses, such as addons/observe/replay.py, as a script.)
"""

from addons.observe.replay import Rehost

addons = [Rehost()]
