"""The one way tests, benchmarks, the demo and the lab harness wait for something to become true.

`wait_for(predicate, timeout_s, what)` calls `predicate` every `interval_s` until it returns a truthy value, and
returns that value (so a wait can hand back what it found: `vm = wait_for(lambda: ... and v, 30, "web Running")`).
On timeout it raises `TimeoutError` naming `what` and the last tolerated error, so a failure message says what was
awaited. Invariants:

- the predicate is called at least once, and once more at or after the deadline: a condition that became true while
  the waiter slept past the deadline is still seen (a slow, busy CI machine does not turn into a false failure);
- only the `tolerate`d errors (by default what a peer that is still starting raises: a gRPC error, an OSError, a
  failed subprocess) are retried; any other exception is a bug in the predicate or the code under test and
  propagates at once;
- time is `time.monotonic()`: a wall-clock step never shortens or extends a wait.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Literal, TypeVar

import grpc

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (grpc.RpcError, OSError, subprocess.SubprocessError)


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    timeout_s: float,
    what: str,
    interval_s: float = 0.2,
    *,
    tolerate: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
) -> T:
    """Return the first truthy value of `predicate()` within `timeout_s`; TimeoutError (naming `what`) otherwise."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except tolerate as error:
            last_error = error
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            break
        time.sleep(min(interval_s, left_s))
    detail = f" (last error: {last_error})" if last_error is not None else ""
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}{detail}")
