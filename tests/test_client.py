import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from regflow.data.io import read_volume, write_nifti
from regflow.errors import DataError, RegflowError
from regflow.serving.client import request_registration
from regflow.serving.codec import encode_result, join_results, read_request

AFFINE = np.array([[0.0, 0.0, 1.5, -10.0], [0.0, 2.0, 0.0, 5.0], [1.0, 0.0, 0.0, 3.0],
                   [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture
def pair(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("fixed", "moving"):
        paths[name] = write_nifti(tmp_path / f"{name}.nii.gz",
                                  rng.random((9, 10, 8), dtype=np.float32), AFFINE)
    label = np.zeros((9, 10, 8), np.uint8)
    label[1:4, 2:5, 1:3] = 2
    paths["moving_label"] = write_nifti(tmp_path / "moving_label.nii.gz", label, AFFINE)
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StubServer:
    """A real HTTP server on loopback whose /invocations answer comes from ``respond(body)``."""

    def __init__(self, respond):
        outer = self
        self.requests: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body})
                status, answer = respond(body)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def shift_answer(body):
    """Answer like the real model would for a one-voxel shift along axis 0 (reporting the
    refinement steps when the request asks for some)."""
    pairs = read_request(body)
    results = []
    for pair in (encoded.decode() for encoded in pairs):
        ddf = np.zeros((3, *pair["fixed"].shape), np.float32)
        ddf[0] = 1.0
        result = {"ddf": ddf, "warped": np.roll(pair["moving"], -1, axis=0),
                  "affine": pair["fixed_affine"]}
        if pair["moving_label"] is not None:
            result["warped_label"] = np.roll(pair["moving_label"], -1, axis=1)
        results.append(result)
    predictions = join_results([encode_result(result, pair.encoding)
                                for result, pair in zip(results, pairs, strict=True)])
    if pairs[0].refine_steps is not None:
        predictions.update(refine_steps=[pair.refine_steps for pair in pairs],
                           time_s=[0.25] * len(pairs))
    return 200, {"predictions": predictions}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regflow.cli", "request", *args],
                          capture_output=True, text=True, timeout=60)


def test_missing_file_is_a_data_error_naming_it(pair, tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(DataError, match="nope.nii.gz: no such file"):
        request_registration("http://127.0.0.1:9", pair["fixed"], missing, None, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_server_not_listening_is_one_line_regflow_error(pair, tmp_path):
    port = free_port()
    with pytest.raises(RegflowError) as caught:
        request_registration(f"http://127.0.0.1:{port}", pair["fixed"], pair["moving"], None,
                             tmp_path / "o", timeout=5)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"http://127.0.0.1:{port}/invocations: no answer")
    assert not (tmp_path / "o").exists()


def test_http_error_carries_status_and_server_message(pair, tmp_path):
    def refuse(body):
        return 400, {"error_code": "BAD_REQUEST",
                     "message": "inputs.moving[0]: not valid base64\nsecond line"}

    with StubServer(refuse) as server, pytest.raises(RegflowError) as caught:
        request_registration(server.url + "/", pair["fixed"], pair["moving"], None,
                             tmp_path / "o", timeout=5)
    message = str(caught.value)
    assert "\n" not in message
    assert "/invocations: HTTP 400" in message
    assert "inputs.moving[0]: not valid base64" in message


def test_silent_server_times_out_as_regflow_error(pair, tmp_path):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(RegflowError, match="no answer"):
            request_registration(url, pair["fixed"], pair["moving"], None, tmp_path / "o",
                                 timeout=0.5)


def test_answer_is_written_as_nifti_with_the_fixed_affine(pair, tmp_path):
    with StubServer(shift_answer) as server:
        answer = request_registration(server.url, pair["fixed"], pair["moving"],
                                      pair["moving_label"], tmp_path / "out", timeout=10)
    written = answer.written
    assert (answer.refine_steps, answer.time_s) == (None, None)
    assert server.requests[0]["path"] == "/invocations"
    assert sorted(server.requests[0]["body"]["inputs"]) == ["fixed", "moving", "moving_label"]
    assert sorted(path.name for path in written) == ["ddf.nii.gz", "warped.nii.gz",
                                                     "warped_label.nii.gz"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(
        path.name for path in written)
    ddf, ddf_affine = read_volume(tmp_path / "out" / "ddf.nii.gz")
    warped, warped_affine = read_volume(tmp_path / "out" / "warped.nii.gz")
    label, _ = read_volume(tmp_path / "out" / "warped_label.nii.gz")
    moving, _ = read_volume(pair["moving"])
    moving_label, _ = read_volume(pair["moving_label"])
    assert ddf.shape == (9, 10, 8, 3)
    np.testing.assert_array_equal(ddf[..., 0], 1.0)
    np.testing.assert_array_equal(ddf[..., 1:], 0.0)
    np.testing.assert_allclose(ddf_affine, AFFINE)
    np.testing.assert_allclose(warped_affine, AFFINE)
    np.testing.assert_allclose(warped, np.roll(moving, -1, axis=0))
    np.testing.assert_array_equal(label, np.roll(moving_label, -1, axis=0))


def test_cli_exit_2_one_line_when_no_server(pair, tmp_path):
    result = run_cli(f"http://127.0.0.1:{free_port()}", "--fixed", str(pair["fixed"]),
                     "--moving", str(pair["moving"]), "--out", str(tmp_path / "o"),
                     "--timeout", "5")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.stderr
    assert "no answer" in result.stderr


def test_cli_exit_2_naming_a_missing_file(pair, tmp_path):
    missing = tmp_path / "absent_label.nii.gz"
    result = run_cli("http://127.0.0.1:9", "--fixed", str(pair["fixed"]), "--moving",
                     str(pair["moving"]), "--moving-label", str(missing), "--out",
                     str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"{missing}: no such file" in result.stderr


def test_cli_asks_for_refine_steps_and_reports_what_the_server_applied(pair, tmp_path):
    with StubServer(shift_answer) as server:
        result = run_cli(server.url, "--fixed", str(pair["fixed"]), "--moving",
                         str(pair["moving"]), "--out", str(tmp_path / "o"), "--refine-steps", "0")
    assert result.returncode == 0, result.stderr
    assert server.requests[0]["body"]["inputs"]["refine_steps"] == 0
    assert result.stdout.strip().endswith("(0 refinement steps, 0.250 s on the server)")
    assert sorted(path.name for path in (tmp_path / "o").iterdir()) == ["ddf.nii.gz",
                                                                       "warped.nii.gz"]


def test_cli_refuses_negative_refine_steps_in_one_line(pair, tmp_path):
    result = run_cli("http://127.0.0.1:9", "--fixed", str(pair["fixed"]), "--moving",
                     str(pair["moving"]), "--out", str(tmp_path / "o"), "--refine-steps", "-1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--refine-steps" in result.stderr
