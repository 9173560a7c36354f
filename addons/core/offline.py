"""The chain without a proxy: hooks run over a flow by hand, upstream answers with no socket.

The offline replay (addons.observe.replay) re-makes the chain's decisions this way, and the
unit tests drive the chain with the same two pieces, so that both run the hooks in the order
mitmproxy does and both answer `requests` calls the way a real transport would.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import requests
from mitmproxy import http

from addons.core.wire import whole_response

#: The hooks mitmproxy runs before a request goes upstream.
REQUEST_HOOKS = ("requestheaders", "request")


async def run_hooks(addons: Sequence[Any], flow: http.HTTPFlow, hooks: Sequence[str] = REQUEST_HOOKS) -> http.HTTPFlow:
    """Run `hooks` over `addons` as mitmproxy does: hook by hook, addon by addon, awaiting async ones."""
    for hook in hooks:
        for addon in addons:
            fn = getattr(addon, hook, None)
            if fn is None:
                continue
            result = fn(flow)
            if inspect.isawaitable(result):
                await result
    return flow


def run_hooks_now(addons: Sequence[Any], flow: http.HTTPFlow, hooks: Sequence[str] = REQUEST_HOOKS) -> http.HTTPFlow:
    """`run_hooks` on an event loop of its own, for callers that have none (tests, scripts)."""
    return asyncio.run(run_hooks(addons, flow, hooks))


#: What a transport answers: status, headers (a mapping, or pairs to repeat a header), body.
Answer = tuple[int, "Mapping[str, str] | Sequence[tuple[str, str]]", bytes]


class AnswerAdapter(requests.adapters.HTTPAdapter):
    """
    A `requests` transport that never opens a socket: `answer(request)` gives the answer, or
    raises what a transport raises (`requests.ConnectionError`, `requests.Timeout`). It keeps
    the requests it was sent and the last timeout, for tests to look at.
    """

    def __init__(self, answer: Callable[[requests.PreparedRequest], Answer]) -> None:
        super().__init__()
        self.answer = answer
        self.seen: list[requests.PreparedRequest] = []
        self.timeout: Any = None

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        self.seen.append(request)
        self.timeout = timeout
        status, headers, body = self.answer(request)
        return whole_response(self, request, status, headers, body)

    async def asend(self, request: requests.PreparedRequest, timeout: Any = None, verify: Any = True) -> requests.Response:
        """The event loop's `send` (addons.core.wire.WireAdapter.asend): answered the same way."""
        return self.send(request, timeout=timeout, verify=verify)


def answering_session(answer: Callable[[requests.PreparedRequest], Answer]) -> tuple[requests.Session, AnswerAdapter]:
    """A session whose every http:// and https:// request `answer` answers (no proxy settings read)."""
    adapter = AnswerAdapter(answer)
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session, adapter
