"""Group commit: many callers' small writes in one transaction, in arrival order.

A caller awaits `submit(item)`; items that arrive while a flush is running wait for the next one, and the next one
takes all of them (up to `max_items`). One flush runs at a time, so a burst of N callers costs about N / max_items
transactions instead of N, and a lone caller costs one transaction, started on the next turn of the event loop
(callers of the same turn share it).

Invariants:
- **Every caller hears its own outcome.** `flush` returns one outcome per item, in order: a value, or an exception
  for that item alone (a refused Hello does not refuse the others); an exception raised by `flush` itself (the
  database refused the transaction) is every item's outcome in that flush.
- **Nothing left hanging.** A flush cancelled (the manager stopping) fails its items and those still waiting
  with `GroupCommitClosed`; a caller that goes away does not stop the flush its item is in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
R = TypeVar("R")


class GroupCommitClosed(RuntimeError):
    """The group commit stopped (the manager is stopping) before this item was written."""


class GroupCommit(Generic[Item, R]):
    def __init__(self, flush: Callable[[list[Item]], Awaitable[Sequence[R | BaseException]]],
                 max_items: int = 500) -> None:
        self._flush, self._max_items = flush, max_items
        self._waiting: list[tuple[Item, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0  # transactions so far (for tests and metrics)

    async def submit(self, item: Item) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        future.add_done_callback(_retrieved)  # a caller that went away leaves no "never retrieved" warning
        self._waiting.append((item, future))
        if self._task is None:
            self._task = loop.create_task(self._run())
        return await asyncio.shield(future)  # a caller's cancel leaves the flush (and the others) alone

    async def _run(self) -> None:
        chunk: list[tuple[Item, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                await asyncio.sleep(0)  # callers of this turn of the loop join the flush
                chunk, self._waiting = self._waiting[:self._max_items], self._waiting[self._max_items:]
                try:
                    outcomes: Sequence[R | BaseException] | BaseException = await self._flush(
                        [item for item, _ in chunk])
                except Exception as error:
                    outcomes = error
                self.flushes += 1
                for index, (_, future) in enumerate(chunk):
                    if future.done():
                        continue
                    outcome = outcomes if isinstance(outcomes, BaseException) else outcomes[index]
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                chunk = []
        except asyncio.CancelledError:
            self._fail(chunk + self._waiting)
            self._waiting = []
            raise
        finally:
            self._task = None

    @staticmethod
    def _fail(items: list[tuple[Item, asyncio.Future[R]]]) -> None:
        for _, future in items:
            if not future.done():
                future.set_exception(GroupCommitClosed("the manager stopped before the write"))

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._fail(self._waiting)
        self._waiting = []


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
