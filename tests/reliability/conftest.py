"""Fixtures of the reliability suite: the tiny logged model (tests/test_serving.py), a
`regflow serve` of it with the default limits, a valid request and its answer."""

import json

import numpy as np
import pytest

from benchmarks.serving_attacks import post_raw, serving
from regflow.serving.codec import encode_volume
from tests.test_serving import tiny_model_uri  # noqa: F401

DEFAULT_LIMITS = ("REGFLOW_MAX_VOXELS", "REGFLOW_MAX_PAIRS", "REGFLOW_MAX_CHANNELS",
                  "REGFLOW_MAX_MEMORY", "REGFLOW_QUEUE_TIMEOUT", "REGFLOW_MAX_REFINE_STEPS",
                  "REGFLOW_MIN_SIZE")


@pytest.fixture(scope="module")
def server_env(mlflow_store):
    """The server's variables: the test store, every REGFLOW_* limit unset (the defaults)."""
    return {"MLFLOW_TRACKING_URI": mlflow_store, **dict.fromkeys(DEFAULT_LIMITS, "")}


@pytest.fixture(scope="module")
def server(tiny_model_uri, server_env, tmp_path_factory):  # noqa: F811
    """`regflow serve` of the tiny model on a loopback port, one worker, default limits."""
    log = tmp_path_factory.mktemp("reliability") / "serve.log"
    with serving(tiny_model_uri, log, 1, env=server_env) as running:
        yield running


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
    """The server's answer to the valid request."""
    body = json.dumps({"inputs": {key: [text] for key, text in valid.items()}}).encode()
    status, answer = post_raw(server.url, body)
    assert status == 200, answer[:300]
    return json.loads(answer)["predictions"]
