"""Reliability: a real `mlflow models serve` of a tiny regflow model under hostile requests.

Facts measured here (printed with -s): time to the refusal, the server's peak RSS (its whole
process tree, sampled every 10 ms), error body sizes. Asserted: the contract's thresholds with
their margins (413 in under 1 s, peak RSS under 1.5 GB, error bodies under 2 KB and never quoting
the base64 input) and that the server still answers a valid request correctly afterwards.
Default limits (REGFLOW_MAX_VOXELS 256^3, REGFLOW_MAX_PAIRS 8) apply.
"""

import base64
import gzip
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import psutil
import pytest

from regflow.codec import decode_volume, encode_volume
from tests.test_serving import post, post_raw, serve

pytestmark = pytest.mark.slow

REFUSAL_S = 1.0
MAX_RSS = 1.5e9
MAX_ERROR_BODY = 2048
HOSTILE_CLIENTS = 16
MIB_OF_ZEROS = gzip.compress(b"\0" * 2**20, compresslevel=9)  # about 1 KB


def nifti_gz_bomb(shape: tuple[int, ...], zeros_mib: int) -> str:
    """Base64 of a gzip file: a float32 NIfTI header declaring ``shape``, then ``zeros_mib`` MiB
    of zeros as 1 MiB gzip members (a valid multi-member gzip file, cheap to build)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_data_offset(352)
    payload = gzip.compress(header.binaryblock + b"\0" * 4) + MIB_OF_ZEROS * zeros_mib
    return base64.b64encode(payload).decode("ascii")


class PeakRss:
    """Samples the RSS of a process and all its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        self.process, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = 0
        for process in [self.process, *self.process.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakRss":
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


@pytest.fixture(scope="module")
def server(tiny_model_uri, mlflow_store, tmp_path_factory):
    """`mlflow models serve` of the tiny model, default limits, one worker: (url, pid)."""
    log = tmp_path_factory.mktemp("reliability") / "serve.log"
    env = {"MLFLOW_TRACKING_URI": mlflow_store}
    for name in ("REGFLOW_MAX_VOXELS", "REGFLOW_MAX_PAIRS", "REGFLOW_MAX_CHANNELS"):
        env[name] = ""  # unset: the defaults
    with serve(tiny_model_uri, log, env) as (url, process):
        yield url, process.pid


@pytest.fixture(scope="module")
def valid():
    """A valid tiny request (16, 24, 16) with a label; the base64 texts."""
    rng = np.random.default_rng(5)
    fixed = rng.random((16, 24, 16), dtype=np.float32)
    label = (fixed > 0.5).astype(np.float32)
    return {"fixed": encode_volume(fixed), "moving": encode_volume(np.roll(fixed, 1, axis=0)),
            "moving_label": encode_volume(np.roll(label, 1, axis=0))}


@pytest.fixture(scope="module")
def reference_answer(server, valid):
    status, body = post(server[0], {"inputs": {key: [text] for key, text in valid.items()}})
    assert status == 200, body
    return body["predictions"]


def check_error(status: int, body: bytes, expected: int, inputs: dict) -> str:
    """The status, a short JSON body without any of the base64 input; returns the message."""
    assert status == expected, body[:300]
    assert len(body) < MAX_ERROR_BODY, len(body)
    for values in inputs.values():
        for text in values if isinstance(values, list) else []:
            assert text[:64].encode() not in body, "the error body quotes the request"
    return json.loads(body)["message"]


HOSTILE = {
    "expands-to-700^3": (lambda fixed: {"fixed": [fixed], "moving": [nifti_gz_bomb(
        (700, 700, 700), 1309)]}, "shape (700, 700, 700) is 343,000,000 voxels, over the limit "
                                  "of 16,777,216 per volume (REGFLOW_MAX_VOXELS)"),
    "gzip-bomb-4-gib": (lambda fixed: {"fixed": [fixed], "moving": [nifti_gz_bomb(
        (64, 64, 64), 4096)]}, "gzip data inflates past the 1,048,928 bytes its NIfTI header "
                               "declares"),
    "too-many-pairs": (lambda fixed: {"fixed": [fixed] * 9, "moving": [fixed] * 9},
                       "inputs: 9 pairs, over the limit of 8 per request (REGFLOW_MAX_PAIRS)"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_is_413_fast_and_the_server_stays_small(server, valid, case):
    url, pid = server
    build, expected = HOSTILE[case]
    inputs = build(valid["fixed"])
    body = json.dumps({"inputs": inputs}).encode()
    with PeakRss(pid) as rss:
        started = time.perf_counter()
        status, answer = post_raw(url, body, timeout=30)
        elapsed = time.perf_counter() - started
    message = check_error(status, answer, 413, inputs)
    print(f"\n{case}: request {len(body) / 1e6:.2f} MB -> HTTP {status} in {elapsed:.3f} s, "
          f"body {len(answer)} B, server peak RSS {rss.peak / 1e6:.0f} MB")
    assert expected in message
    assert elapsed < REFUSAL_S
    assert rss.peak < MAX_RSS


def test_unknown_field_is_400_naming_it(server, valid):
    inputs = {"fixed": [valid["fixed"]], "moving": [valid["moving"]], "mask": [valid["fixed"]]}
    status, answer = post_raw(server[0], json.dumps({"inputs": inputs}).encode())
    message = check_error(status, answer, 400, inputs)
    assert message == ("inputs: unknown field(s) mask; expected fixed, moving, moving_label, "
                       "refine_steps")


def test_null_label_is_200_without_a_warped_label(server, valid, reference_answer):
    inputs = {"fixed": [valid["fixed"]], "moving": [valid["moving"]], "moving_label": None}
    status, body = post(server[0], {"inputs": inputs})
    assert status == 200, body
    assert sorted(body["predictions"]) == ["ddf", "warped"]
    assert body["predictions"]["ddf"] == reference_answer["ddf"]


def test_concurrent_hostile_requests_then_a_valid_one_is_answered_correctly(
        server, valid, reference_answer):
    url, pid = server
    cases = [HOSTILE[name][0](valid["fixed"]) for name in HOSTILE]
    bodies = [json.dumps({"inputs": cases[index % len(cases)]}).encode()
              for index in range(HOSTILE_CLIENTS)]
    with PeakRss(pid) as rss, ThreadPoolExecutor(max_workers=HOSTILE_CLIENTS) as pool:
        started = time.perf_counter()
        answers = list(pool.map(lambda body: post_raw(url, body, timeout=60), bodies))
        elapsed = time.perf_counter() - started
    for index, (status, answer) in enumerate(answers):
        check_error(status, answer, 413, cases[index % len(cases)])
    print(f"\n{HOSTILE_CLIENTS} concurrent hostile requests "
          f"({sum(map(len, bodies)) / 1e6:.1f} MB in all): all 413 in {elapsed:.2f} s, "
          f"server peak RSS {rss.peak / 1e6:.0f} MB")
    assert rss.peak < MAX_RSS
    status, body = post(url, {"inputs": {key: [text] for key, text in valid.items()}})
    assert status == 200, body
    assert body["predictions"] == reference_answer
    ddf, _, _ = decode_volume(body["predictions"]["ddf"][0], "ddf", channels=True)
    assert ddf.shape == (3, 16, 24, 16) and np.isfinite(ddf).all()


def workers_of(pid: int) -> list[psutil.Process]:
    """The live uvicorn worker processes under a server (multiprocessing spawn children)."""
    workers = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:  # gone, or a zombie not yet reaped
            pass
    return workers


def test_sigkill_of_one_of_two_workers_is_survived(tiny_model_uri, mlflow_store, valid,
                                                   reference_answer, tmp_path):
    with serve(tiny_model_uri, tmp_path / "serve.log", {"MLFLOW_TRACKING_URI": mlflow_store},
               workers=2) as (url, process):
        workers = workers_of(process.pid)
        assert len(workers) == 2, [worker.cmdline() for worker in workers]
        killed = workers[0].pid
        os.kill(killed, signal.SIGKILL)
        started = time.monotonic()
        answered = []
        while time.monotonic() - started < 30:
            pids = {worker.pid for worker in workers_of(process.pid)}
            if len(pids) == 2 and killed not in pids:
                break
            answered.append(post(url, {"inputs": {key: [text] for key, text in valid.items()}}))
            time.sleep(0.2)
        replaced_s = time.monotonic() - started
        assert process.poll() is None, "the server exited after one worker was killed"
        print(f"\nSIGKILL of worker {killed} (of 2): server alive, replacement worker up in "
              f"{replaced_s:.1f} s; {len(answered)} requests meanwhile, statuses "
              f"{sorted({status for status, _ in answered})}")
        assert len(pids) == 2 and killed not in pids
        assert all(status == 200 for status, _ in answered)
        for _ in range(4):  # both workers answer like the one that served the reference
            status, body = post(url, {"inputs": {key: [text] for key, text in valid.items()}})
            assert status == 200 and body["predictions"] == reference_answer
