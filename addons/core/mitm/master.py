"""The mirror's mitmproxy master and the edits it makes to the addon chain and the flow writer.

`put_first_in_chain` and `swap_addon_class` change `AddonManager`'s chain and lookup directly,
and `SaveCopies` re-implements `Save`'s writing methods over Save's own state:
tests/test_mitm_internals.py pins each of these against the installed mitmproxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mitmproxy.types
from mitmproxy import command, flow, http
from mitmproxy.addons.save import Save


#: mitmdump's default addons that a registry mirror in reverse mode never uses: playback, the
#: onboarding app, DNS, header and body rewriting, cookies, HAR, export and the commands of the
#: console. Each addon in the chain costs time on every event of every request (mitmproxy walks
#: the whole chain for each of the ~11 events of a request): without these a warm manifest HEAD
#: costs about 1 ms less CPU. Their options are gone with them, so `--set anticache=true` is an
#: unknown option rather than a setting that silently does nothing.
UNUSED_DEFAULT_ADDONS = frozenset({
    "Browser", "StripDnsHttpsRecords", "AntiCache", "AntiComp", "ClientPlayback", "ServerPlayback",
    "CommandHistory", "Comment", "Cut", "Export", "Onboarding", "DnsResolver", "MapRemote", "MapLocal",
    "ModifyBody", "ModifyHeaders", "StickyAuth", "StickyCookie", "SaveHar", "UpstreamAuth",
})


def mirror_master(options: Any) -> Any:
    """mitmdump's master (`DumpMaster` without its flow printer) with only the addons a
    registry mirror uses; also without `--rfile` and `--keepserving`, which are about replays."""
    from mitmproxy import addons as builtin
    from mitmproxy.addons import errorcheck
    from mitmproxy.master import Master

    master = Master(options, with_termlog=True)
    # Every log record would also walk the addon chain as the `add_log` event, deprecated since
    # mitmproxy 9, that no addon of the mirror handles: about 0.2 ms per record.
    master._legacy_log_events.uninstall()
    master.addons.add(*[a for a in builtin.default_addons() if type(a).__name__ not in UNUSED_DEFAULT_ADDONS])
    master.addons.add(errorcheck.ErrorCheck())
    return master


def put_first_in_chain(master: Any, addon: Any, after: str = "") -> bool:
    """
    Put `addon` first in the master's addon chain, or second when the addon named `after` is
    first: hooks run in chain order, so it then sees every flow before the built-in addons that
    save or show it. Idempotent by name; no `load` is run (the addon must need none).
    """
    manager = master.addons
    if manager.get(addon.name) is not None:
        return False
    manager.lookup[addon.name] = addon
    at = 1 if after and manager.chain and getattr(manager.chain[0], "name", "") == after else 0
    manager.chain.insert(at, addon)
    return True


def swap_addon_class(master: Any, name: str, cls: type) -> bool:
    """
    Make the addon `name` an instance of `cls`, a subclass of its own class, in place: its place
    in the chain, its open files and its option state stay; only the methods `cls` overrides
    change. Its commands are bound methods, so they are collected again. False when there is no
    such addon, it already is a `cls`, or `cls` does not extend its class.
    """
    addon = master.addons.get(name)
    if addon is None or isinstance(addon, cls) or not issubclass(cls, type(addon)):
        return False
    addon.__class__ = cls
    master.commands.collect_commands(addon)
    return True


def flows_the_writer_holds(master: Any) -> list[http.HTTPFlow]:
    """The flows the built-in flow writer (`save`) has not written yet: it writes them in its
    own `done`, so a scrubber's `done` that runs first must reach them there."""
    save = master.addons.get("save")
    return [f for f in list(getattr(save, "active_flows", ())) if isinstance(f, http.HTTPFlow)]


class SaveCopies(Save):
    """
    mitmproxy's flow writer (the built-in `save` addon: `-w`, mitmweb's and the console's
    save), writing `copy_for_file(flow)` instead of each flow, so that the flow itself, which
    mitmproxy may still send, is never changed for the file's sake. Install it with
    `swap_addon_class(master, "save", Subclass)`.
    """

    def copy_for_file(self, f: flow.Flow) -> flow.Flow:
        """What the file gets for `f`; subclasses make their copy here."""
        return f

    def save_flow(self, flow: flow.Flow) -> None:  # type: ignore[override]
        if not self.stream:
            return
        copy = self.copy_for_file(flow)
        try:
            self.maybe_rotate_to_new_file()
            self.stream.add(copy)
        except OSError as e:
            # As Save: crash visibly rather than let traffic through unrecorded.
            import sys

            sys.stderr.write(f"Error while writing to {self.current_path}: {e}")
            sys.exit(1)
        else:
            self.active_flows.discard(flow)

    def done(self) -> None:
        if self.stream:
            for f in self.active_flows:
                self.stream.add(self.copy_for_file(f))
            self.active_flows.clear()
            self.current_path = None
            self.stream.fo.close()
            self.stream = None

    @command.command("save.file")
    def save(self, flows: Sequence[flow.Flow], path: mitmproxy.types.Path) -> None:
        """Save flows to a file, as the flow writer writes them. A leading + appends."""
        super().save([self.copy_for_file(f) for f in flows], path)
