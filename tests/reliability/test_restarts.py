"""Reliability: a restart that restarts. SIGKILL of `regflow serve` (the supervisor of its
uvicorn workers) ends the workers within a second or two, and a new `regflow serve` on the same
port binds it and answers (with `mlflow models serve`, the workers of a killed uvicorn supervisor
kept the port and the restart failed with "Address already in use")."""

import json
import os
import signal
import time

import pytest

from benchmarks.serving_attacks import free_port, post_raw, start_server, stop_server
from tests.reliability.test_server_limits import spawned_workers, valid_body

pytestmark = pytest.mark.slow

WORKERS_GONE_S = 10


def test_sigkill_of_the_parent_ends_its_workers_and_a_restart_answers(
        tiny_model_uri, server_env, valid, reference_answer, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    first = start_server(tiny_model_uri, port, log, 2, env=server_env)
    try:
        workers = spawned_workers(first.process.pid)
        assert len(workers) == 2
        os.kill(first.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        while any(worker.is_running() and worker.status() != "zombie" for worker in workers):
            assert time.monotonic() - killed < WORKERS_GONE_S, "workers outlived their parent"
            time.sleep(0.05)
        gone_s = time.monotonic() - killed
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
    restarted = start_server(tiny_model_uri, port, log, 2, env=server_env)
    try:
        up_s = time.monotonic() - killed
        status, answer = post_raw(restarted.url, valid_body(valid))
        print(f"\nSIGKILL of the parent: its 2 workers gone in {gone_s:.2f} s; the restart on "
              f"port {port} answered {status} {up_s:.1f} s after the kill")
        assert status == 200 and json.loads(answer)["predictions"] == reference_answer
    finally:
        stop_server(restarted)
