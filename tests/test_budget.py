"""Tests for regflow.serving.budget: reservations granted in arrival order, timeouts, trimming."""

import asyncio
import threading
import time

import pytest

from regflow.errors import RequestTooLarge, ServerBusy
from regflow.serving.budget import (
    HELD_UNTIL_ANSWERED,
    MemoryBudget,
    release_free_memory,
    tune_allocator,
)


def reserve_in_thread(budget: MemoryBudget, nbytes: int, granted: list) -> threading.Thread:
    def run() -> None:
        granted.append((nbytes, budget.reserve(nbytes, "inputs")))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_reservations_are_granted_in_arrival_order():
    budget = MemoryBudget(100, timeout_s=10, variable="REGFLOW_MAX_MEMORY")
    first = budget.reserve(60, "inputs")
    granted: list = []
    second = reserve_in_thread(budget, 60, granted)
    wait_until(lambda: len(budget._queue) == 1)
    third = reserve_in_thread(budget, 30, granted)  # would fit now, but waits behind the 60
    wait_until(lambda: len(budget._queue) == 2)
    time.sleep(0.1)
    assert granted == [] and budget.free == 40
    first.release()
    second.join(5)
    third.join(5)
    assert sorted(nbytes for nbytes, _ in granted) == [30, 60]
    assert budget.free == 10
    for _, reservation in granted:
        reservation.release()
        reservation.release()  # a second release gives nothing back twice
    assert budget.free == 100


def test_a_reservation_that_waits_too_long_is_server_busy_and_leaves_the_queue():
    budget = MemoryBudget(100, timeout_s=0.2, variable="REGFLOW_MAX_MEMORY")
    held = budget.reserve(90, "inputs")
    started = time.monotonic()
    with pytest.raises(ServerBusy, match=r"^inputs: the server's memory \(REGFLOW_MAX_MEMORY\) "
                                         r"stayed taken for 0.2 s; retry later$"):
        budget.reserve(20, "inputs")
    assert 0.2 <= time.monotonic() - started < 2
    assert len(budget._queue) == 0
    with budget.reserve(10, "inputs") as small:  # what fits is granted at once
        assert small.waited_s < 0.1
    held.release()
    assert budget.free == 100


def test_more_than_the_whole_budget_is_too_large_at_once():
    budget = MemoryBudget(2**30, timeout_s=10, variable="REGFLOW_MAX_MEMORY")
    with pytest.raises(RequestTooLarge, match=r"^inputs: needs about 1,025 MiB of memory, over the "
                                              r"1,024 MiB a server worker may use "
                                              r"\(REGFLOW_MAX_MEMORY\)$"):
        budget.reserve(2**30 + 2**20, "inputs")


def test_a_coroutine_awaits_its_turn_without_blocking_the_loop():
    budget = MemoryBudget(100, timeout_s=5, variable="REGFLOW_MAX_MEMORY")
    held = budget.reserve(100, "inputs")

    async def scenario() -> tuple[float, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        asyncio.get_running_loop().call_later(0.2, held.release)
        reservation = await budget.reserve_async(50, "the request body")
        ticker.cancel()
        reservation.release()
        return reservation.waited_s, ticks

    waited, ticks = asyncio.run(scenario())
    assert waited >= 0.19 and ticks >= 5  # the loop kept running while it waited
    assert budget.free == 100


def test_a_coroutine_that_waits_too_long_is_server_busy():
    budget = MemoryBudget(100, timeout_s=0.1, variable="REGFLOW_MAX_MEMORY")
    budget.reserve(100, "inputs")
    with pytest.raises(ServerBusy, match="the request body: the server's memory"):
        asyncio.run(budget.reserve_async(1, "the request body"))
    assert len(budget._queue) == 0


def test_reservations_can_be_held_until_the_answer_is_sent():
    budget = MemoryBudget(100, timeout_s=1, variable="REGFLOW_MAX_MEMORY")
    budget.reserve(10, "inputs").release_when_answered()  # no server scope: released now
    assert budget.free == 100
    held: list = []
    token = HELD_UNTIL_ANSWERED.set(held)
    try:
        budget.reserve(30, "inputs").release_when_answered()
    finally:
        HELD_UNTIL_ANSWERED.reset(token)
    assert budget.free == 70 and len(held) == 1
    held[0].release()
    assert budget.free == 100


def test_allocator_settings_apply_on_glibc():
    assert tune_allocator() is True  # this project's machines run glibc
    release_free_memory()
