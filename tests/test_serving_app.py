"""Tests for regflow.serving.app: admission of request bodies, the parent watch, the port."""

import asyncio
import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from regflow.errors import RegflowError
from regflow.serving.app import Admission, wait_for_port
from regflow.serving.budget import HELD_UNTIL_ANSWERED
from regflow.serving.limits import Limits


class BlockingApp:
    """An inner ASGI app that holds every request until ``release`` is set; it records the
    reservations the server holds for it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held: list = []

    async def __call__(self, scope, receive, send) -> None:
        self.held.append(list(HELD_UNTIL_ANSWERED.get() or []))
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def request(length: int | None, path: str = "/invocations") -> dict:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "path": path, "method": "POST", "headers": headers}


async def call(app, scope) -> tuple[int, dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(message.get("body", b"") for message in sent)
    return sent[0]["status"], json.loads(body or b"{}")


def test_bodies_wait_for_memory_and_get_503_when_it_stays_taken():
    async def scenario():
        inner = BlockingApp()
        # 8 MiB budget: bodies may hold 2 MiB, i.e. 256 KiB of body at 8 bytes per byte
        admission = Admission(inner, Limits(max_memory=8 * 2**20, queue_timeout_s=0.3))
        assert admission.max_body == 2**18
        first = asyncio.create_task(call(admission, request(200_000)))
        await asyncio.sleep(0.05)
        assert admission.bodies.free == 2 * 2**20 - 8 * 200_000
        started = time.monotonic()
        second = await call(admission, request(200_000))  # waits, then gives up
        waited = time.monotonic() - started
        small = asyncio.create_task(call(admission, request(10_000)))  # fits beside the first
        await asyncio.sleep(0.05)
        inner.release.set()
        return await first, second, waited, await small, inner.held, admission.bodies.free

    first, second, waited, small, held, free = asyncio.run(scenario())
    assert first == (200, {}) and small == (200, {})
    assert second[0] == 503 and second[1] == {
        "error_code": "TEMPORARILY_UNAVAILABLE",
        "message": "the request body: the server's memory (REGFLOW_MAX_MEMORY) stayed taken "
                   "for 0.3 s; retry later"}
    assert 0.3 <= waited < 2
    assert [[reservation.nbytes for reservation in list_] for list_ in held] == [
        [1_600_000], [80_000]]  # the model's reservations join these until the answer is sent
    assert free == 2 * 2**20


def test_a_body_refused_with_503_is_read_before_the_answer():
    """A client that sends its whole body before reading (urllib, requests) gets the 503, not a
    broken pipe: every chunk is received before the answer starts."""
    async def scenario():
        inner = BlockingApp()
        admission = Admission(inner, Limits(max_memory=8 * 2**20, queue_timeout_s=0.1))
        first = asyncio.create_task(call(admission, request(200_000)))
        await asyncio.sleep(0.05)
        events = []
        chunks = [b"x" * 50_000] * 4

        async def receive():
            events.append("chunk")
            body = chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}

        async def send(message):
            events.append(message.get("status", "body"))

        await admission(request(200_000), receive, send)
        inner.release.set()
        await first
        return events

    assert asyncio.run(scenario()) == ["chunk"] * 4 + [503, "body"]


@pytest.mark.parametrize(("length", "status", "message"), [
    (None, 411, "the request body: no Content-Length; send it with its length"),
    (2**18 + 1, 413, "the request body: 0 MiB, over the 0 MiB a server worker accepts "
                     "(REGFLOW_MAX_MEMORY: parsing a body takes 8 bytes per byte, and bodies may "
                     "hold a quarter of it)"),
])
def test_bodies_without_a_length_or_too_large_never_reach_the_app(length, status, message):
    inner = BlockingApp()
    admission = Admission(inner, Limits(max_memory=8 * 2**20))
    answer = asyncio.run(call(admission, request(length)))
    assert answer[0] == status and answer[1]["message"] == message
    assert inner.held == []


def test_other_endpoints_pass_through_without_admission():
    inner = BlockingApp()
    inner.release.set()
    admission = Admission(inner, Limits(max_memory=8 * 2**20))
    assert asyncio.run(call(admission, {**request(None, "/ping"), "method": "GET"}))[0] == 200
    assert inner.held == [[]]


def test_a_worker_ends_when_its_supervisor_is_killed():
    """A child that watches its parent (as a uvicorn worker of regflow serve does) is gone
    within a second of a SIGKILL of that parent."""
    child_code = ("import os, time\n"
                  "from regflow.serving.app import watch_parent\n"
                  "watch_parent(int(os.environ['PARENT']), 0.05)\n"
                  "print('watching', flush=True)\n"
                  "time.sleep(60)\n")
    parent_code = ("import os, subprocess, sys, time\n"
                   f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}], "
                   "env={**os.environ, 'PARENT': str(os.getpid())})\n"
                   "print(child.pid, flush=True)\n"
                   "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline().strip() == "watching"
    parent.kill()
    parent.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < 10:
        if not child.is_running() or child.status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.05)
    else:
        child.kill()
        pytest.fail("the watching child outlived its parent by 10 s")
    print(f"\nchild gone {time.monotonic() - killed:.2f} s after its parent's SIGKILL")


def test_wait_for_port_waits_for_a_listener_to_go_and_names_a_taken_port():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with pytest.raises(RegflowError, match=rf"^127.0.0.1:{port}: address already in use after "
                                           r"0.3 s \(another server is listening there\)$"):
        wait_for_port("127.0.0.1", port, timeout_s=0.3)
    loop = asyncio.new_event_loop()
    loop.call_later(0.3, listener.close)
    started = time.monotonic()
    loop.run_until_complete(asyncio.to_thread(wait_for_port, "127.0.0.1", port, 5.0))
    loop.close()
    assert 0.2 < time.monotonic() - started < 3
