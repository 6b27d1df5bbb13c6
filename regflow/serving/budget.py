"""A process's memory for requests: a budget of bytes that requests reserve before they allocate,
waiting their turn when it is taken, and freed memory handed back to the system afterwards.

A :class:`MemoryBudget` grants reservations first come, first served: a reservation that does not
fit waits (a thread blocks in :meth:`MemoryBudget.reserve`, a coroutine awaits
:meth:`MemoryBudget.reserve_async`) until those before it have been granted and enough bytes are
free, or fails with :class:`~regflow.errors.ServerBusy` (HTTP 503) after ``timeout_s``; one larger
than the whole budget fails at once with :class:`~regflow.errors.RequestTooLarge` (413). Strict
order means a large request is never overtaken forever by small ones.

glibc keeps freed memory in its heaps instead of returning it, and grows the size above which it
maps large blocks separately each time such a block is freed, so a worker's resident size only
grows after large requests. :func:`tune_allocator` fixes that threshold (blocks of 1 MiB and more
are mapped on their own and unmapped when freed) and :func:`release_free_memory` trims the heaps;
both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from regflow.errors import RequestTooLarge, ServerBusy

MMAP_THRESHOLD = 2**20  # bytes: larger blocks are mapped apart and unmapped when freed
TRIM_ABOVE = 64 * 2**20  # a released reservation this large trims the heaps
HELD_UNTIL_ANSWERED: contextvars.ContextVar[list[Reservation] | None] = contextvars.ContextVar(
    "regflow_held_until_answered", default=None)
"""Set by the server around a request: reservations put in this list are released once the
answer has been sent (the JSON answer is built after the model's ``predict`` returns)."""
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers of glibc's malloc.h
_M_ARENA_MAX = -8
ARENA_MAX = 2  # heaps shared by a worker's threads (glibc's default is 8 per core)


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``malloc_trim``), else None."""
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name)
        library.malloc_trim  # noqa: B018 - glibc only: raises AttributeError elsewhere
    except (OSError, AttributeError, TypeError):
        return None
    return library


_LIBC = _glibc()


def tune_allocator() -> bool:
    """Make glibc return large freed blocks at once and share few heaps between threads.

    Returns:
        Whether the settings were applied (False where the C library is not glibc).
    """
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(_LIBC.mallopt(_M_ARENA_MAX, ARENA_MAX))


def release_free_memory() -> None:
    """Hand the free memory of every glibc heap back to the system (``malloc_trim(0)``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def mib(nbytes: int) -> str:
    """Bytes as MiB for messages: ``"1,536 MiB"``."""
    return f"{nbytes / 2**20:,.0f} MiB"


@dataclass
class _Waiter:
    nbytes: int
    wake: Callable[[], None]
    granted: bool = False


@dataclass
class Reservation:
    """Bytes held from a :class:`MemoryBudget` until :meth:`release` (or the ``with`` block's end).

    Attributes:
        nbytes: the bytes held.
        waited_s: seconds the reservation waited for its turn.
    """

    budget: MemoryBudget
    nbytes: int
    waited_s: float
    released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Give the bytes back (once; later calls do nothing); a large reservation also hands
        the free memory back to the system (:func:`release_free_memory`)."""
        if not self.released:
            self.released = True
            self.budget._give_back(self.nbytes)
            if self.nbytes >= TRIM_ABOVE:
                release_free_memory()

    def release_when_answered(self) -> None:
        """Release now, or once the answer is sent when the server holds reservations until
        then (:data:`HELD_UNTIL_ANSWERED`)."""
        held = HELD_UNTIL_ANSWERED.get()
        if held is None:
            self.release()
        else:
            held.append(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class MemoryBudget:
    """Bytes that the requests of one process may hold at once, granted in arrival order.

    Args:
        total: the budget in bytes.
        timeout_s: the longest a reservation waits for its turn.
        variable: the environment variable that sets ``total``, named in messages.
    """

    def __init__(self, total: int, timeout_s: float, variable: str) -> None:
        self.total, self.timeout_s, self.variable = total, timeout_s, variable
        self._free = total
        self._queue: deque[_Waiter] = deque()
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        """Bytes not reserved now."""
        with self._lock:
            return self._free

    def reserve(self, nbytes: int, what: str) -> Reservation:
        """Hold ``nbytes``, waiting for them (blocking this thread) up to ``timeout_s``.

        Args:
            nbytes: bytes to hold.
            what: what needs them, for messages (``"inputs"``, ``"the request body"``).

        Raises:
            RequestTooLarge: ``nbytes`` exceeds the whole budget.
            ServerBusy: not granted within ``timeout_s``.
        """
        event = threading.Event()
        started = time.monotonic()
        waiter = self._enqueue(nbytes, what, event.set)
        if not event.wait(self.timeout_s):
            self._give_up(waiter, what)
        return Reservation(self, nbytes, time.monotonic() - started)

    async def reserve_async(self, nbytes: int, what: str) -> Reservation:
        """As :meth:`reserve`, awaiting the turn instead of blocking the event loop."""
        loop = asyncio.get_running_loop()
        granted = loop.create_future()
        started = time.monotonic()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: granted.done() or granted.set_result(None))

        waiter = self._enqueue(nbytes, what, wake)
        try:
            await asyncio.wait_for(asyncio.shield(granted), self.timeout_s)
        except TimeoutError:
            self._give_up(waiter, what)
        return Reservation(self, nbytes, time.monotonic() - started)

    def _enqueue(self, nbytes: int, what: str, wake: Callable[[], None]) -> _Waiter:
        if nbytes > self.total:
            raise RequestTooLarge(f"{what}: needs about {mib(nbytes)} of memory, over the "
                                  f"{mib(self.total)} a server worker may use ({self.variable})")
        waiter = _Waiter(nbytes, wake)
        with self._lock:
            self._queue.append(waiter)
            self._grant()
        return waiter

    def _give_up(self, waiter: _Waiter, what: str) -> None:
        """A waiter's time is up: leave the queue, unless it was granted meanwhile."""
        with self._lock:
            if waiter.granted:
                return
            self._queue.remove(waiter)
            self._grant()  # those behind it may fit now
        raise ServerBusy(f"{what}: the server's memory ({self.variable}) stayed taken for "
                         f"{self.timeout_s:g} s; retry later")

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self._free += nbytes
            self._grant()

    def _grant(self) -> None:
        """Grant waiters from the head of the queue while they fit (the lock is held)."""
        while self._queue and self._queue[0].nbytes <= self._free:
            waiter = self._queue.popleft()
            self._free -= waiter.nbytes
            waiter.granted = True
            waiter.wake()
