"""Everything the mirror does that leans on mitmproxy 11.0's internals, in one package.

Each function here relies on something mitmproxy does not promise as API; tests/test_mitm_internals.py
and tests/test_handoff.py pin every such assumption against the installed mitmproxy, so that an
upgrade that changes one fails a test instead of silently losing speed, a scrubbed flow file, or a
stall cut.

* `loop`: the event loop runner (uvloop when installed) and `ReadSize`, which makes upstream
  connections read 1 MiB per event.
* `master`: the mirror's mitmproxy master without the default addons it never uses, and the addon
  chain edits: `put_first_in_chain` puts an addon ahead of the built-in ones (hooks run in
  `AddonManager.chain` order, and `add` only appends), so that the credential scrubbers run before
  `save` writes and mitmweb shows a flow; `swap_addon_class` gives a built-in addon (the flow
  writer `save`) a subclass of its own class in place, keeping its place, open file and options;
  `SaveCopies` is mitmproxy's `Save` writing a copy of each flow that a subclass makes.
* `web`: mitmweb's routes adjusted for the mirror (streamed bodies, the focused flow).
* `handoff`: the connection table (`connection_io` looks a flow's connections up in the
  `proxyserver` addon's `connections`, the table mitmproxy's own `inject` commands use, and its
  handler's `transports`), to tell a stalled upstream from a slow client, to cut a connection, and
  to write a blob's body straight to the client socket.
"""
