"""Reliability: a real `regflow serve` of a tiny regflow model under hostile requests.

Facts measured here (printed with -s): time to the answer, the peak RSS of the server's whole
process tree (sampled every 10 ms), error body sizes. Asserted for every attack, sent once and then
16 times at once: the status and a message naming the limit or the field, a refusal within
seconds (before the work, which takes minutes), the tree's peak RSS under 1.5 GB, error bodies
under 2 KB that never quote the base64 input, and the valid request answered exactly as before
right after. Default limits apply (REGFLOW_MAX_VOXELS 256^3, _PAIRS 8, _CHANNELS 16, _MEMORY 768
MiB, REGFLOW_MIN_SIZE 8; the tiny model refines 0 steps, so REGFLOW_MAX_REFINE_STEPS is 0). The
attacks are those of benchmarks.serving_attacks, which measures them against a trained model
before and after.
"""

import json
import os
import signal
import time

import numpy as np
import psutil
import pytest

from benchmarks.serving_attacks import (
    PeakRss,
    b64,
    burst,
    nifti_b64,
    nifti_gz_bomb,
    noise,
    post_raw,
    serving,
    sform_b64,
    workers_of,
    zero_column,
)
from regflow.serving.codec import decode_volume

pytestmark = pytest.mark.slow

REFUSAL_S = 5.0  # refused without the work (which takes 30 s to minutes); generous on a shared CPU
MAX_RSS = 1.5e9
MAX_ERROR_BODY = 2048
HOSTILE_CLIENTS = 16


def valid_body(valid) -> bytes:
    return json.dumps({"inputs": {key: [text] for key, text in valid.items()}}).encode()


def check_error(status: int, body: bytes, expected: int, inputs: dict) -> str:
    """The status, a short JSON body without any of the base64 input; returns the message."""
    assert status == expected, body[:300]
    assert len(body) < MAX_ERROR_BODY, len(body)
    for values in inputs.values():
        for text in values if isinstance(values, list) else []:
            if isinstance(text, str):
                assert text[:64].encode() not in body, "the error body quotes the request"
    return json.loads(body)["message"]


COARSE = np.diag([10.0, 10.0, 10.0, 1.0])
HOSTILE = {
    "expands-to-700^3": (
        lambda valid: {"fixed": [valid["fixed"]], "moving": [nifti_gz_bomb((700,) * 3, 1309)]},
        413, "inputs.moving[0]: shape (700, 700, 700) is 343,000,000 voxels, over the limit of "
             "16,777,216 per volume (REGFLOW_MAX_VOXELS)"),
    "gzip-bomb-4-gib": (
        lambda valid: {"fixed": [valid["fixed"]], "moving": [nifti_gz_bomb((64,) * 3, 4096)]},
        413, "inputs.moving[0]: gzip data inflates past the 1,048,928 bytes its NIfTI header "
             "declares"),
    "gzip-bomb-256^3-header": (  # fits the budget: inflated (to 64 MiB) one at a time
        lambda valid: {"fixed": [valid["fixed"]], "moving": [nifti_gz_bomb((256,) * 3, 65)]},
        413, "inputs.moving[0]: gzip data inflates past the 67,109,216 bytes its NIfTI header "
             "declares"),
    "256^3-pair-over-the-memory-budget": (
        lambda valid: {"fixed": [nifti_gz_bomb((256,) * 3, 65)],
                       "moving": [nifti_gz_bomb((256,) * 3, 65)]},
        413, "MiB of memory, over the 576 MiB a server worker may use (REGFLOW_MAX_MEMORY)"),
    "too-many-pairs": (
        lambda valid: {"fixed": [valid["fixed"]] * 9, "moving": [valid["fixed"]] * 9},
        413, "inputs: 9 pairs, over the limit of 8 per request (REGFLOW_MAX_PAIRS)"),
    "48^3-at-10-mm": (
        lambda valid: {"fixed": [nifti_b64(noise((48,) * 3, 1), COARSE)],
                       "moving": [nifti_b64(noise((48,) * 3, 2), COARSE)]},
        413, "inputs.fixed[0]: resampled to the model's 1 x 1 x 1 mm voxels shape (480, 480, 480) "
             "is 110,592,000 voxels, over the limit of 16,777,216 per volume "
             "(REGFLOW_MAX_VOXELS)"),
    "label-with-1000-values": (
        lambda valid: {"fixed": [valid["fixed"]], "moving": [valid["moving"]],
                       "moving_label": [nifti_b64(
                           (np.arange(16 * 24 * 16) % 1000).reshape(16, 24, 16).astype(np.int16))]},
        413, "inputs.moving_label[0]: 999 distinct non-zero label values, over the limit of 16 "
             "per volume (REGFLOW_MAX_CHANNELS)"),
    "refine-steps-over-the-limit": (
        lambda valid: {"fixed": [valid["fixed"]], "moving": [valid["moving"]],
                       "refine_steps": 1000},
        413, "inputs.refine_steps: 1000 steps, over the limit of 0 (REGFLOW_MAX_REFINE_STEPS)"),
    "body-over-what-a-worker-parses": (
        lambda valid: {"fixed": [valid["fixed"]], "moving": [b64(os.urandom(20 * 2**20))]},
        413, "the request body: 27 MiB, over the 24 MiB a server worker accepts "
             "(REGFLOW_MAX_MEMORY"),
    "sform-with-a-zero-column": (
        lambda valid: {"fixed": [sform_b64(noise((16, 24, 16), 3), zero_column())],
                       "moving": [valid["moving"]]},
        400, "inputs.fixed[0]: zero voxel size along axis 1 (the affine's column 1 is zero)"),
    "2x2x2-pair": (
        lambda valid: {"fixed": [nifti_b64(noise((2, 2, 2), 4))],
                       "moving": [nifti_b64(noise((2, 2, 2), 5))]},
        400, "inputs.fixed[0]: shape (2, 2, 2) is below the minimum of 8 voxels along axis 0 "
             "(REGFLOW_MIN_SIZE)"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_once_and_16_at_once(server, valid, reference_answer, case):
    build, expected_status, expected = HOSTILE[case]
    inputs = build(valid)
    body = json.dumps({"inputs": inputs}).encode()
    with PeakRss(server.process.pid) as rss:
        started = time.perf_counter()
        status, answer = post_raw(server.url, body, timeout=60)
        elapsed = time.perf_counter() - started
    message = check_error(status, answer, expected_status, inputs)
    assert expected in message
    many = burst(server, body, HOSTILE_CLIENTS)
    print(f"\n{case}: request {len(body) / 1e6:.2f} MB -> HTTP {status} in {elapsed:.3f} s, "
          f"body {len(answer)} B, peak RSS {rss.peak / 1e6:.0f} MB; {HOSTILE_CLIENTS} at once: "
          f"{many['statuses']} in {many['seconds']} s, peak RSS {many['peak_rss_mb']} MB")
    assert elapsed < REFUSAL_S
    assert rss.peak < MAX_RSS
    assert many["statuses"] == [expected_status] and expected in many["message"]
    assert many["peak_rss_mb"] * 1e6 < MAX_RSS
    status, answer = post_raw(server.url, valid_body(valid))
    assert status == 200 and json.loads(answer)["predictions"] == reference_answer


def test_16_valid_requests_at_once_are_all_answered_alike(server, valid, reference_answer):
    outcome = burst(server, valid_body(valid), HOSTILE_CLIENTS)
    print(f"\n{HOSTILE_CLIENTS} valid requests at once: {outcome['statuses']} in "
          f"{outcome['seconds']} s, peak RSS {outcome['peak_rss_mb']} MB")
    assert outcome["statuses"] == [200]
    assert outcome["peak_rss_mb"] * 1e6 < MAX_RSS
    status, answer = post_raw(server.url, valid_body(valid))
    assert status == 200 and json.loads(answer)["predictions"] == reference_answer


def test_refine_steps_0_is_answered_and_reported(server, valid, reference_answer):
    inputs = {key: [text] for key, text in valid.items()}
    status, answer = post_raw(server.url, json.dumps(
        {"inputs": {**inputs, "refine_steps": 0}}).encode())
    assert status == 200, answer[:300]
    predictions = json.loads(answer)["predictions"]
    print(f"\nrefine_steps 0: {1000 * predictions['time_s'][0]:.0f} ms on the server")
    assert predictions["refine_steps"] == [0]
    assert {key: predictions[key] for key in reference_answer} == reference_answer


def test_null_label_is_200_without_a_warped_label(server, valid, reference_answer):
    inputs = {"fixed": [valid["fixed"]], "moving": [valid["moving"]], "moving_label": None}
    status, body = post_raw(server.url, json.dumps({"inputs": inputs}).encode())
    assert status == 200, body
    predictions = json.loads(body)["predictions"]
    assert sorted(predictions) == ["ddf", "warped"]
    assert predictions["ddf"] == reference_answer["ddf"]
    ddf, _, _ = decode_volume(predictions["ddf"][0], "ddf", channels=True)
    assert ddf.shape == (3, 16, 24, 16) and np.isfinite(ddf).all()


def spawned_workers(pid: int) -> list:
    """The live uvicorn worker processes under a server (multiprocessing spawn children); a
    killed worker not yet reaped (a zombie) or gone meanwhile is not one."""
    live = []
    for child in workers_of(pid):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                live.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return live


def test_sigkill_of_one_of_two_workers_is_survived(tiny_model_uri, server_env, valid,
                                                   reference_answer, tmp_path):
    with serving(tiny_model_uri, tmp_path / "serve.log", 2, env=server_env) as running:
        workers = spawned_workers(running.process.pid)
        assert len(workers) == 2, [worker.cmdline() for worker in workers]
        killed = workers[0].pid
        os.kill(killed, signal.SIGKILL)
        started = time.monotonic()
        answered = []
        while time.monotonic() - started < 60:
            pids = {worker.pid for worker in spawned_workers(running.process.pid)}
            if len(pids) == 2 and killed not in pids:
                break
            answered.append(post_raw(running.url, valid_body(valid)))
            time.sleep(0.2)
        replaced_s = time.monotonic() - started
        assert running.process.poll() is None, "the server exited after one worker was killed"
        print(f"\nSIGKILL of worker {killed} (of 2): server alive, replacement worker up in "
              f"{replaced_s:.1f} s; {len(answered)} requests meanwhile, statuses "
              f"{sorted({status for status, _ in answered})}")
        assert len(pids) == 2 and killed not in pids
        assert all(status == 200 for status, _ in answered)
        for _ in range(4):  # both workers answer like the one that served the reference
            status, body = post_raw(running.url, valid_body(valid))
            assert status == 200 and json.loads(body)["predictions"] == reference_answer
