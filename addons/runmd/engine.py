"""`+ .engine`: the order in which blocks run when the mirror starts, and what happens after.

```
``` mirror
+ .engine
: .event install
: .event start
: .loop
```
```
An engine block's name is the symbol its events' blocks share (lifec's convention):
`.event install` runs the blocks opened with "``` install mirror", in document order: first
their runtime steps, then, when one of them has a `+ .proxy`, it serves until the proxy
exits. `.loop [INITIAL, MAX]` starts over from the first event after a back-off that doubles
from INITIAL (default 1s) to MAX (default 60s) while things keep failing; `.exit` ends the
engine; without either the engine ends after its last event.

Under an engine the proxy runs in a child process (`acr mirror serve`) that the engine
supervises: a proxy that crashes is restarted (with `.loop`) instead of taking the node's
mirror down with it, and SIGTERM or SIGINT to the engine stops the child and ends with exit 0.
A runtime step that fails on the first round is fatal (the error names the step, so the
operator can fix it or `--id` past it); on later rounds, after the mirror has served, it is
retried after the back-off, since a login that worked once is most likely failing for a while.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from addons.runmd.compile import Compiled
from addons.runmd.children import ChildrenStopping, describe_exit
from addons.core.duration import format_duration, parse_duration
from addons.runmd.plugin import Plugin, split_list
from addons.runmd.syntax import Block, Document, Root, RunmdError, Step
from addons.runmd.runtime import Runtime, StepError

logger = logging.getLogger(__name__)

#: The exit code of `acr` for a usage error: a proxy child that says so will say it again.
EXIT_USAGE = 2


class EnginePlugin(Plugin):
    roots = frozenset({"engine"})


class Event(EnginePlugin):
    plugin = "event"

    @classmethod
    def parse(cls, text: str) -> str:
        words = text.split()
        if len(words) != 1:
            raise ValueError(f"expected one block name, e.g. '.event start', got '{text}'")
        return words[0]


@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 1.0
    maximum: float = 60.0


class Loop(EnginePlugin):
    plugin = "loop"

    @classmethod
    def parse(cls, text: str) -> BackoffPolicy:
        items = split_list(text)
        if not items:
            return BackoffPolicy()
        if len(items) != 2:
            raise ValueError(f"expected '.loop' or '.loop INITIAL, MAX' (e.g. '.loop 1s, 60s'), got '{text}'")
        initial, maximum = (parse_duration(i) for i in items)
        if maximum < initial:
            raise ValueError(f"the back-off maximum {items[1]} is below its start {items[0]}")
        return BackoffPolicy(initial, maximum)


class Exit(EnginePlugin):
    plugin = "exit"


class Backoff:
    """Doubling delays while rounds keep failing; a clean round, or one that ran at least
    MAX seconds (a proxy that served a long while before it crashed), starts again at INITIAL."""

    def __init__(self, policy: BackoffPolicy) -> None:
        self.policy = policy
        self.failures = 0

    def after(self, failed: bool, ran: float) -> float:
        if not failed or ran >= self.policy.maximum:
            self.failures = 0
        if not failed:
            return self.policy.initial
        delay = min(self.policy.maximum, self.policy.initial * 2**self.failures)
        self.failures += 1
        return delay


# --- the engines of a document ---------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One step of an engine: an event with the blocks it runs, a loop or an exit."""

    step: Step
    blocks: tuple[Block, ...] = ()

    @property
    def kind(self) -> str:
        return self.step.plugin

    def roots(self) -> Iterator[Root]:
        for block in self.blocks:
            yield from block.roots

    def ids(self) -> set[int]:
        """The ids `--id` may name to start at this action."""
        out = {self.step.id}
        for root in self.roots():
            out.add(root.id)
            out.update(s.id for s in root.steps)
        return out


@dataclass
class EngineSpec:
    name: str
    block: Block
    root: Root
    actions: list[Action] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or "(unnamed)"

    @property
    def loop(self) -> BackoffPolicy | None:
        for action in self.actions:
            if action.kind == "loop":
                return Loop.parse(action.step.input)
        return None

    def proxies(self) -> list[Root]:
        return [r for a in self.actions for r in a.roots() if r.kind == "proxy"]


def engines(doc: Document) -> list[EngineSpec]:
    """Every `+ .engine` of the document with its events resolved to blocks; RunmdError when an
    event names no block, a step can never run, or two engines share a name."""
    out: list[EngineSpec] = []
    seen: dict[str, EngineSpec] = {}
    for block in doc.blocks:
        for root in block.roots:
            if root.kind != "engine":
                continue
            spec = EngineSpec(name=block.name, block=block, root=root)
            if spec.name in seen:
                raise RunmdError(
                    doc.path, root.line,
                    f"a second engine named '{spec.label}' (the first is at line {seen[spec.name].root.line}): "
                    "give each engine block its own name",
                )
            seen[spec.name] = spec
            final: Step | None = None
            for step in root.steps:
                if final is not None:
                    raise RunmdError(doc.path, step.line, f"'.{step.plugin}' after '.{final.plugin}' (line {final.line}) never runs")
                if step.plugin in ("loop", "exit"):
                    final = step
                    spec.actions.append(Action(step))
                    continue
                name = Event.parse(step.input)
                blocks = tuple(b for b in doc.blocks if b.name == name and b.symbol == block.name)
                wanted = f"``` {name} {block.name}".rstrip()
                if not blocks:
                    raise RunmdError(doc.path, step.line, f"'.event {name}': no block opened with '{wanted}' in this file")
                for b in blocks:
                    if any(r.kind == "engine" for r in b.roots):
                        raise RunmdError(doc.path, step.line, f"'.event {name}': block '{b.title}' (line {b.line}) is an engine itself")
                spec.actions.append(Action(step, blocks))
            out.append(spec)
    return out


def check(compiled: Compiled) -> None:
    """The catalog's hook: a file whose engines cannot run does not load."""
    engines(compiled.document)


def select(compiled: Compiled, name: str | None) -> EngineSpec | None:
    """The engine to run: the one named, the only one, or None when the file has none."""
    found = engines(compiled.document)
    names = ", ".join(repr(e.label) for e in found)
    if name is not None:
        for spec in found:
            if spec.name == name:
                return spec
        if not found:
            raise ValueError(f"{compiled.path} has no engine ('+ .engine'), so no engine '{name}'")
        raise ValueError(f"{compiled.path} has no engine '{name}' (engines: {names})")
    if len(found) > 1:
        raise ValueError(f"{compiled.path} has several engines ({names}): pick one with --engine-name")
    return found[0] if found else None


def start_point(spec: EngineSpec, start_id: int) -> tuple[int, int]:
    """(index of the first action, the step id to start at in it) for `--id start_id`."""
    if not start_id or start_id == spec.root.id:
        return 0, 0
    for index, action in enumerate(spec.actions):
        if start_id == action.step.id:
            return index, 0
        if start_id in action.ids():
            return index, start_id
    raise ValueError(
        f"step {start_id} is in no event of engine '{spec.label}' (see 'acr dump': its events' blocks are "
        + ", ".join(f"'{b.title}'" for a in spec.actions for b in a.blocks)
        + ")"
    )


def unused_blocks(doc: Document, spec: EngineSpec) -> list[Block]:
    """Blocks with runtime or proxy steps that this engine never runs."""
    used = {id(b) for a in spec.actions for b in a.blocks}
    return [
        b for b in doc.blocks
        if id(b) not in used and b is not spec.block and any(r.kind in ("runtime", "proxy") for r in b.roots)
    ]


# --- running ---------------------------------------------------------------------------


class EngineError(Exception):
    """The engine cannot go on; one line for the operator."""


class ProxyExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"the proxy {describe_exit(code)}")
        self.code = code


class Engine:
    """Runs one engine's actions; `serve_argv` is the command of the proxy child."""

    def __init__(
        self, spec: EngineSpec, runtime: Runtime, serve_argv: Sequence[str], *,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.serve_argv = list(serve_argv)
        self.rounds = 0
        #: How long a round ran, and the wait before the next (True when asked to stop): a test
        #: gives its own, so the back-off is checked without waiting for it.
        self.clock = clock
        self.sleep = sleep or runtime.children.sleep

    @property
    def stopping(self) -> bool:
        return self.runtime.children.stopping

    def stop(self, *_: Any) -> None:
        """Stop the child that runs now and end the engine cleanly (SIGTERM/SIGINT handler)."""
        if not self.stopping:
            logger.info("engine %s: stopping", self.spec.label)
        self.runtime.children.stop()

    def run(self, start_id: int = 0, *, handle_signals: bool = True) -> int:
        previous = {}
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self.stop)
        try:
            return self._run(start_id)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self, start_id: int) -> int:
        spec = self.spec
        for block in unused_blocks(self.runtime.compiled.document, spec):
            logger.warning("engine %s: block '%s' (line %d) is in no event: its steps do not run", spec.label, block.title, block.line)
        policy = spec.loop
        backoff = Backoff(policy or BackoffPolicy())
        index, first_id = start_point(spec, start_id)
        while True:
            self.rounds += 1
            began = self.clock()
            failed = False
            for action in spec.actions[index:]:
                if self.stopping:
                    return 0
                if action.kind == "exit":
                    logger.info("engine %s: step %d: .exit", spec.label, action.step.id)
                    return 0
                if action.kind == "loop":
                    break
                try:
                    self._event(action, first_id)
                except (StepError, ProxyExit, ChildrenStopping) as e:
                    if self.stopping:
                        return 0
                    fatal = (
                        policy is None
                        or (self.rounds == 1 and isinstance(e, StepError))
                        or (isinstance(e, ProxyExit) and e.code == EXIT_USAGE)
                    )
                    if fatal:
                        if isinstance(e, StepError):
                            raise
                        raise EngineError(f"event '{action.step.input}' (step {action.step.id}): {e}") from None
                    logger.error("engine %s: event '%s' (step %d) failed: %s", spec.label, action.step.input, action.step.id, e)
                    failed = True
                    break
                finally:
                    first_id = 0
            else:
                logger.info("engine %s: done", spec.label)
                return 0
            if self.stopping:
                return 0
            delay = backoff.after(failed, self.clock() - began)
            logger.info("engine %s: starting over in %s", spec.label, format_duration(delay))
            if self.sleep(delay):
                return 0
            index, first_id = 0, 0

    def _event(self, action: Action, first_id: int) -> None:
        spec = self.spec
        titles = ", ".join(f"'{b.title}'" for b in action.blocks)
        logger.info("engine %s: step %d: .event %s (%s)", spec.label, action.step.id, action.step.input, titles)
        roots = list(action.roots())
        self.runtime.run(first_id, roots)
        proxies = [r for r in roots if r.kind == "proxy"]
        if proxies:
            self._serve(proxies[0])

    def _serve(self, root: Root) -> None:
        children = self.runtime.children
        try:
            proc = children.spawn(self.serve_argv, capture=False)
        except OSError as e:
            raise EngineError(f"cannot start the proxy ({self.serve_argv[0]}): {e.strerror or e}") from None
        logger.info("engine %s: proxy %d serving on %s (pid %d)", self.spec.label, root.id, root.input, proc.pid)
        code = children.wait(proc, grace=5.0)
        if self.stopping:
            logger.info("engine %s: proxy stopped (pid %d)", self.spec.label, proc.pid)
            return
        if code != 0:
            raise ProxyExit(code)
        logger.info("engine %s: the proxy ended (pid %d)", self.spec.label, proc.pid)
