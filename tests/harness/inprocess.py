"""The mirror's chain in this process, for unit tests: hooks driven over a flow as mitmproxy
runs them, upstream requests answered by a function instead of a server (addons.core.offline,
which the offline replay uses too)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import requests
from mitmproxy import http
from mitmproxy.test import taddons

from addons.core.offline import REQUEST_HOOKS, Answer, AnswerAdapter, answering_session, run_hooks_now
from addons.proxy.state import MirrorState


def drive(mirror: Any, flow: http.HTTPFlow, hooks: Sequence[str] = REQUEST_HOOKS) -> http.HTTPFlow:
    """Run `hooks` over the mirror's chain in a mitmproxy test context: hook by hook, addon by addon."""
    with taddons.context(mirror):
        return run_hooks_now(mirror.addons, flow, hooks)


def install(state: MirrorState, answer: Callable[[requests.PreparedRequest], Answer]) -> AnswerAdapter:
    """Make `answer` the upstream of every request the mirror sends with its own session."""
    session, adapter = answering_session(answer)
    state.use_session(session)
    return adapter


def calls(adapter: AnswerAdapter) -> list[str]:
    """The requests the adapter was sent, as `METHOD /path?query`."""
    return [f"{r.method} {r.path_url}" for r in adapter.seen]
