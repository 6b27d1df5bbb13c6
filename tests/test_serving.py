"""Serving: the contract on MLflow's real scoring app in-process (fast), and end to end (slow):
train on real hippocampus data, register, serve with `mlflow models serve`."""

import base64
import contextlib
import gzip
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
import uvicorn
import yaml
from click.testing import CliRunner
from mlflow.pyfunc import scoring_server

from benchmarks.serving_attacks import post_raw, sform_b64, zero_column
from regflow import metrics
from regflow.cli import cli
from regflow.config import load_config
from regflow.data.io import read_volume, write_nifti
from regflow.data.manifest import Manifest
from regflow.engine import Trainer
from regflow.inference import Volume, load_registrar
from regflow.predict import _unregistered_label
from regflow.registry import pip_requirements
from regflow.serving.app import Admission
from regflow.serving.budget import MemoryBudget
from regflow.serving.codec import decode_volume, encode_volume
from regflow.serving.limits import Limits
from regflow.serving.model import CHECKPOINT_ARTIFACT, RegflowPythonModel, input_example, signature
from regflow.stages import (
    evaluate_stage,
    fetch_stage,
    preprocess_stage,
    register_stage,
    train_stage,
)
from tests.restorage import assert_registers_alike, mean_dice, restorage_cases
from tests.synthetic import write_params

DATASET = "msd-hippocampus"
TRAIN_STEPS = 200
PING_TIMEOUT_S = 90
REQUEST_TIMEOUT_S = 120


def training_params(work: Path, model_name: str) -> dict:
    """A small label-driven model on real data: LocalNet 8-16-32, no augmentation."""
    return {
        "seed": 1,
        "data": {"dataset": DATASET, "raw_dir": str(work / "data/raw"),
                 "processed_dir": str(work / "data/processed")},
        "preprocess": {"shape": [48, 64, 48]},
        "loader": {"batch_size": 2, "eval_pairs": 8, "augment": {"enabled": False}},
        "train": {"name": "hippocampus", "steps": TRAIN_STEPS, "val_every": TRAIN_STEPS,
                  "checkpoint_every": TRAIN_STEPS,
                  "model": {"backbone": {"name": "local", "channels": [8, 16, 32]}},
                  "optimizer": {"lr": 2e-3, "clip_grad_norm": 5.0, "schedule": "cosine",
                                "warmup_steps": 20},
                  "loss": {"image": {"lncc": {"weight": 1.0}},
                           "label": {"dice": {"weight": 1.0,
                                              "options": {"scales": [0, 1, 2, 4, 8]}}},
                           "regularization": {"bending_energy": {"weight": 0.5}}},
                  "best_params": None},
        "evaluate": {"hd95": False, "save_volumes": False},
        "registry": {"model_name": model_name},
        "tune": {"trials": 0},
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def champion(tmp_path_factory, mirror, mlflow_store):
    """Fetch, preprocess, train, evaluate and register; the working directory stays set."""
    work = tmp_path_factory.mktemp("serving")
    name = f"regflow-serving-{uuid.uuid4().hex[:8]}"
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(training_params(work, name), sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        started = time.monotonic()
        config = load_config(params)
        fetch_stage(config, DATASET, mirror=str(mirror))
        preprocess_stage(config, DATASET)
        train_stage(config)
        headline = evaluate_stage(config)
        decision = register_stage(config)
        print(f"\nfixture: fetch+preprocess+train({TRAIN_STEPS} steps)+evaluate+register "
              f"{time.monotonic() - started:.1f} s; test-split Dice "
              f"{headline['dice_mean_before']:.3f} -> {headline['dice_mean']:.3f}")
        assert decision["champion"], decision
        manifest = Manifest.read(work / "data/processed" / DATASET / "manifest.json")
        checkpoint = work / "models/hippocampus/best.pt"
        yield {"name": name, "work": work, "config": config, "headline": headline,
               "manifest": manifest, "checkpoint": checkpoint,
               "registrar": load_registrar(str(checkpoint), config, device=torch.device("cpu")),
               "raw": Path(mirror) / "Task04_Hippocampus"}


@pytest.fixture(scope="module")
def tiny_model_uri(tmp_path_factory, tiny_raw, mlflow_store) -> str:
    """A tiny regflow pyfunc model (2 training steps on the synthetic data) logged to MLflow."""
    work = tmp_path_factory.mktemp("tiny-model")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        config = load_config(write_params(work, tiny_raw), ["train.steps=2", "train.val_every=2"])
        fetch_stage(config, "tiny")
        preprocess_stage(config, "tiny")
        Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    mlflow.set_experiment("regflow-serving-tests")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=RegflowPythonModel(),
            artifacts={CHECKPOINT_ARTIFACT: str(work / "models/tiny/best.pt")},
            signature=signature(), input_example=input_example(),
            pip_requirements=pip_requirements())  # given: inferring them costs a subprocess
    return info.model_uri


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it when it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def pinging(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serve(model_uri: str, log_path: Path, env: dict[str, str] | None = None,
          workers: int = 1) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow models serve -m MODEL_URI --env-manager local` on a free loopback port.

    Yields the base URL and the process (the leader of its own process group) once /ping answers;
    ``env`` adds variables (e.g. REGFLOW_MAX_VOXELS). The venv's bin goes first on PATH: MLflow
    starts `uvicorn` by name.
    """
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **(env or {}),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while not pinging(url):
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}: "
                            f"{log_path.read_text()[-2000:]}")
            if time.monotonic() - started > PING_TIMEOUT_S:
                pytest.fail(f"no /ping in {PING_TIMEOUT_S} s: {log_path.read_text()[-2000:]}")
            time.sleep(0.25)
        print(f"\nserver up on /ping in {time.monotonic() - started:.1f} s")
        yield url, process
    finally:
        stop(process)


@pytest.fixture(scope="module")
def server(champion, mlflow_store):
    """`mlflow models serve -m models:/<name>@champion` on a free loopback port."""
    with serve(f"models:/{champion['name']}@champion", champion["work"] / "serve.log",
               {"MLFLOW_TRACKING_URI": mlflow_store}) as (url, _):
        yield url


def post(url: str, payload: dict) -> tuple[int, dict]:
    """POST JSON to /invocations: (HTTP status, parsed body)."""
    status, body = post_raw(url, json.dumps(payload).encode())
    return status, json.loads(body or b"{}")


def raw_paths(champion, case_id: str) -> tuple[Path, Path]:
    return (champion["raw"] / "imagesTr" / f"{case_id}.nii.gz",
            champion["raw"] / "labelsTr" / f"{case_id}.nii.gz")


def b64_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def pair(champion):
    """Held-out (test split) cases with different raw shapes: the first as fixed, and as moving
    the one that overlaps it least without registration (so that registration has room to help).
    """
    cases = list(champion["manifest"].split_cases("test"))
    fixed_id = cases[0]
    fixed = Volume.read(raw_paths(champion, fixed_id)[0])
    fixed_label = Volume.read(raw_paths(champion, fixed_id)[1])
    candidates = {}
    for case_id in cases[1:]:
        image = Volume.read(raw_paths(champion, case_id)[0])
        if image.array.shape != fixed.array.shape:
            label = Volume.read(raw_paths(champion, case_id)[1])
            before = _unregistered_label(champion["registrar"], fixed, image, label, "centre")
            candidates[case_id] = mean_dice(fixed_label.array, before)
    moving_id = min(candidates, key=candidates.get)
    volumes = {}
    for role, case_id in (("fixed", fixed_id), ("moving", moving_id)):
        image_path, label_path = raw_paths(champion, case_id)
        volumes[role] = Volume.read(image_path)
        volumes[f"{role}_label"] = Volume.read(label_path)
        volumes[f"{role}_path"], volumes[f"{role}_label_path"] = image_path, label_path
    volumes["payload"] = {"inputs": {"fixed": [b64_file(volumes["fixed_path"])],
                                     "moving": [b64_file(volumes["moving_path"])],
                                     "moving_label": [b64_file(volumes["moving_label_path"])]}}
    return volumes


def decode_answer(body: dict, index: int = 0) -> dict[str, tuple]:
    predictions = body["predictions"]
    return {field: decode_volume(values[index], field, channels=field != "warped")
            for field, values in predictions.items() if values[index] is not None}


@pytest.fixture(scope="module")
def single_answer(server, pair):
    status, body = post(server, pair["payload"])
    assert status == 200, body
    return decode_answer(body)


@pytest.mark.slow
def test_served_pair_is_registered_on_the_fixed_grid(champion, pair, single_answer):
    fixed_shape = pair["fixed"].array.shape
    assert pair["moving"].array.shape != fixed_shape
    ddf, ddf_affine, encoding = single_answer["ddf"]
    warped, warped_affine, _ = single_answer["warped"]
    label, _, _ = single_answer["warped_label"]
    assert encoding == "nii.gz"
    assert ddf.shape == (3, *fixed_shape)
    assert warped.shape == fixed_shape
    assert label.shape == (1, *fixed_shape)
    np.testing.assert_allclose(ddf_affine, pair["fixed"].affine)
    np.testing.assert_allclose(warped_affine, pair["fixed"].affine)
    assert set(np.unique(label)) <= {0.0, 1.0, 2.0}
    before = _unregistered_label(champion["registrar"], pair["fixed"], pair["moving"],
                                 pair["moving_label"], "centre")
    dice_before = mean_dice(pair["fixed_label"].array, before)
    dice_after = mean_dice(pair["fixed_label"].array, label[0])
    print(f"\npair {pair['fixed_path'].name} <- {pair['moving_path'].name}: Dice over labels "
          f"1,2 without registration {dice_before:.3f}, served registration {dice_after:.3f}")
    assert dice_after > dice_before + 0.05


@pytest.mark.slow
def test_served_answer_matches_in_process_registration(champion, pair, single_answer):
    # Latency is a benchmark's business: `python -m benchmarks.serving_attacks` times valid
    # requests (client and server p50) at several refine_steps.
    local = champion["registrar"].register_volumes(pair["fixed"], pair["moving"],
                                                   pair["moving_label"])
    np.testing.assert_allclose(single_answer["ddf"][0], local["ddf"], atol=1e-4)
    mismatch = np.mean(single_answer["warped_label"][0][0] != local["warped_label"])
    assert mismatch < 1e-3, "label values may differ only at ties between two values' masks"


@pytest.mark.slow
def test_npy_request_gets_npy_answer(server, pair):
    payload = {"inputs": {"fixed": [encode_volume(pair["fixed"].array, encoding="npy")],
                          "moving": [encode_volume(pair["moving"].array, encoding="npy")]}}
    status, body = post(server, payload)
    assert status == 200, body
    assert sorted(body["predictions"]) == ["ddf", "warped"]
    answer = decode_answer(body)
    ddf, affine, encoding = answer["ddf"]
    assert (encoding, affine) == ("npy", None)
    assert ddf.shape == (3, *pair["fixed"].array.shape)
    assert answer["warped"][0].shape == pair["fixed"].array.shape
    assert base64.b64decode(body["predictions"]["ddf"][0])[:6] == b"\x93NUMPY"


@pytest.mark.slow
def test_several_pairs_in_one_request(champion, server, pair):
    payload = {"inputs": {"fixed": pair["payload"]["inputs"]["fixed"] * 2,
                          "moving": [pair["payload"]["inputs"]["moving"][0],
                                     pair["payload"]["inputs"]["fixed"][0]]}}
    status, body = post(server, payload)
    assert status == 200, body
    identity_ddf = decode_answer(body, 1)["ddf"][0]
    assert decode_answer(body, 0)["ddf"][0].shape == identity_ddf.shape
    assert np.abs(identity_ddf).mean() < 1.0, "a volume registered to itself barely moves"


@pytest.mark.parametrize(("inputs", "field", "problem"), [
    ({"fixed": "FIXED"}, "moving", "missing"),
    ({"fixed": "FIXED", "moving": ["@@not*base64@@"]}, "inputs.moving[0]", "not valid base64"),
    ({"fixed": "FIXED", "moving": [base64.b64encode(b"hello, world").decode()]},
     "inputs.moving[0]", "not a .nii.gz, .nii or .npy volume"),
    ({"fixed": [encode_volume(np.zeros((12, 10), np.float32))], "moving": "FIXED"},
     "inputs.fixed[0]", "expected a 3-D volume"),
    ({"fixed": "FIXED", "moving": "FIXED", "moving_label": [encode_volume(np.zeros((4, 5, 6)))]},
     "inputs.moving_label[0]", "does not match"),
], ids=["missing-key", "bad-base64", "not-a-volume", "2-d-volume", "label-shape"])
@pytest.mark.slow
def test_malformed_request_is_4xx_naming_the_field(server, pair, inputs, field, problem):
    fixed = pair["payload"]["inputs"]["fixed"]
    inputs = {key: fixed if value == "FIXED" else value for key, value in inputs.items()}
    status, body = post(server, {"inputs": inputs})
    assert 400 <= status < 500, body
    message = body.get("message", "")
    assert field in message, message
    assert problem in message or problem == "missing", message


@pytest.mark.slow
def test_concurrent_requests_all_answer_correctly(server, pair, single_answer):
    swapped = {"inputs": {"fixed": pair["payload"]["inputs"]["moving"],
                          "moving": pair["payload"]["inputs"]["fixed"]}}
    status, body = post(server, swapped)
    assert status == 200, body
    expected = [single_answer["ddf"][0], decode_answer(body)["ddf"][0]]
    payloads = [pair["payload"], swapped] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda payload: post(server, payload), payloads))
    for index, (status, body) in enumerate(answers):
        assert status == 200, body
        ddf = decode_answer(body)["ddf"][0]
        reference = expected[index % 2]
        assert ddf.shape == reference.shape
        np.testing.assert_allclose(ddf, reference, atol=1e-5)


@pytest.mark.slow
def test_request_cli_writes_nifti_with_the_fixed_affine(server, pair, single_answer, tmp_path):
    out = tmp_path / "answer"
    result = subprocess.run(
        [sys.executable, "-m", "regflow.cli", "request", server,
         "--fixed", str(pair["fixed_path"]), "--moving", str(pair["moving_path"]),
         "--moving-label", str(pair["moving_label_path"]), "--out", str(out)],
        capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == [
        "ddf.nii.gz", "warped.nii.gz", "warped_label.nii.gz"]
    fixed_shape = pair["fixed"].array.shape
    ddf, ddf_affine = read_volume(out / "ddf.nii.gz")
    warped, warped_affine = read_volume(out / "warped.nii.gz")
    label, label_affine = read_volume(out / "warped_label.nii.gz")
    assert ddf.shape == (*fixed_shape, 3)
    assert warped.shape == label.shape == fixed_shape
    for affine in (ddf_affine, warped_affine, label_affine):
        np.testing.assert_allclose(affine, pair["fixed"].affine)
    np.testing.assert_allclose(np.moveaxis(ddf, -1, 0), single_answer["ddf"][0], atol=1e-5)
    assert np.mean(label != single_answer["warped_label"][0][0]) < 1e-3



@pytest.mark.slow
def test_the_pair_restored_differently_registers_alike_served_and_predicted(champion, server,
                                                                            pair, tmp_path):
    """The geometry matrix through the server and through `regflow predict` on files."""
    cases = restorage_cases(pair["fixed"], pair["fixed_label"], pair["moving"],
                            pair["moving_label"])
    served, predicted = {}, {}
    for index, (name, case) in enumerate(cases.items()):
        volumes = {"fixed": case.fixed, "moving": case.moving, "moving_label": case.moving_label}
        inputs = {role: [encode_volume(volume.array, volume.affine)]
                  for role, volume in volumes.items()}
        status, body = post(server, {"inputs": inputs})
        assert status == 200, body
        served[name] = mean_dice(case.fixed_label.array, decode_answer(body)["warped_label"][0][0])
        folder = tmp_path / f"case{index}"
        folder.mkdir()
        for role, volume in volumes.items():
            write_nifti(folder / f"{role}.nii.gz", volume.array, volume.affine)
        result = CliRunner().invoke(cli, [
            "predict", "--model", str(champion["checkpoint"]), "--out", str(folder / "out"),
            "-c", str(champion["work"] / "params.yaml"),
            *(arg for role in volumes for arg in (f"--{role.replace('_', '-')}",
                                                  str(folder / f"{role}.nii.gz")))])
        assert result.exit_code == 0, result.output
        warped_label, _ = read_volume(folder / "out" / "warped_label.nii.gz")
        predicted[name] = mean_dice(case.fixed_label.array, warped_label)
    print()
    for name, case in cases.items():
        assert_registers_alike(f"served, {name}", case, served[name], served["as stored"])
        assert_registers_alike(f"predict, {name}", case, predicted[name], predicted["as stored"])
        assert abs(served[name] - predicted[name]) < 1e-3, name

# The contract on MLflow's real scoring app (mlflow.pyfunc.scoring_server.init) served by uvicorn
# in this process: fast, and the same code path `mlflow models serve` runs.

SMALL_LIMITS = {"REGFLOW_MAX_VOXELS": str(32**3), "REGFLOW_MAX_PAIRS": "2",
                "REGFLOW_MAX_CHANNELS": "4"}
MAX_ERROR_BODY = 2048


@pytest.fixture(scope="module")
def tiny_model(tiny_model_uri):
    """The tiny model loaded as the scoring server loads it, with small limits from the env."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SMALL_LIMITS.items():
            patch.setenv(name, value)
        patch.delenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", raising=False)
        yield mlflow.pyfunc.load_model(tiny_model_uri)


@contextlib.contextmanager
def serving_in_thread(app) -> Iterator[str]:
    """An ASGI app on a loopback port, served by uvicorn from a thread: its URL."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # init() sets it; restored
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not pinging(url):
            assert time.monotonic() < deadline, "the in-process scoring app did not start"
            time.sleep(0.05)
        yield url
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def app_url(tiny_model):
    """MLflow's scoring app for the tiny model on a loopback port, served from a thread."""
    with serving_in_thread(scoring_server.init(tiny_model)) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_pair(tiny_model_uri):
    """A fixed and a moving image (16, 24, 16) and a label with values 0, 1, 2, as base64."""
    rng = np.random.default_rng(3)
    grid = np.indices((16, 24, 16)).astype(np.float32)
    distance = np.sqrt(((grid - np.array([8, 12, 8])[:, None, None, None]) ** 2).sum(0))
    fixed = (distance < 6).astype(np.float32) + 0.01 * rng.random(distance.shape, np.float32)
    moving = np.roll(fixed, 2, axis=1)
    label = np.roll((distance < 6).astype(np.float32) + (distance < 3), 2, axis=1)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    return {"fixed": encode_volume(fixed, affine), "moving": encode_volume(moving, affine),
            "fixed_array": fixed, "moving_array": moving, "distance": np.roll(distance, 2, axis=1),
            "label": label, "affine": affine,
            "moving_label": encode_volume(label, affine)}


@pytest.fixture(scope="module")
def tiny_registrar(tiny_model_uri):
    """The served model's checkpoint as an in-process Registrar (CPU, as the server runs)."""
    return load_registrar(tiny_model_uri, device=torch.device("cpu"))


def tiny_volumes(tiny_pair) -> tuple[Volume, Volume]:
    """The tiny pair as the server decodes it: (fixed, moving) Volumes."""
    return (Volume(tiny_pair["fixed_array"], tiny_pair["affine"], "fixed"),
            Volume(tiny_pair["moving_array"], tiny_pair["affine"], "moving"))


def served_label(url: str, tiny_pair, label: np.ndarray) -> np.ndarray:
    """POST the tiny pair with ``label`` ((*S) or channel-first (C, *S)); the decoded
    (C, *S) warped label."""
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]],
              "moving_label": [encode_volume(label, tiny_pair["affine"])]}
    status, body = post(url, {"inputs": inputs})
    assert status == 200, body
    return decode_volume(body["predictions"]["warped_label"][0], "l", channels=True)[0]


def error_answer(url: str, inputs: dict, status: int) -> str:
    """POST ``{"inputs": inputs}``; check the status and a short body; return its message."""
    got, body = post_raw(url, json.dumps({"inputs": inputs}).encode())
    assert got == status, body[:500]
    assert len(body) < MAX_ERROR_BODY, len(body)
    answer = json.loads(body)
    assert set(answer) == {"error_code", "message"}
    for value in inputs.values():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and len(text) > 40:
                assert text[:40] not in answer["message"], "the body quotes the request"
    return answer["message"]


def test_valid_request_on_the_scoring_app(app_url, tiny_pair):
    inputs = {key: [tiny_pair[key]] for key in ("fixed", "moving", "moving_label")}
    status, body = post(app_url, {"inputs": inputs})
    assert status == 200, body
    ddf, affine, encoding = decode_volume(body["predictions"]["ddf"][0], "ddf", channels=True)
    assert (ddf.shape, encoding) == ((3, 16, 24, 16), "nii.gz")
    np.testing.assert_allclose(affine, tiny_pair["affine"])
    label, _, _ = decode_volume(body["predictions"]["warped_label"][0], "l", channels=True)
    assert label.shape == (1, 16, 24, 16)


# regflow/pyfunc_model.py as versions registered before regflow/serving/ existed carry it
PRE_PACKAGE_MODEL_CODE = """import mlflow

from regflow.serving import RegflowPythonModel

mlflow.models.set_model(RegflowPythonModel())
"""


def test_a_version_logged_with_the_pre_package_model_code_loads_and_answers_alike(
        tiny_model, tiny_model_uri, tiny_pair, tmp_path):
    code = tmp_path / "pyfunc_model.py"
    code.write_text(PRE_PACKAGE_MODEL_CODE)
    downloaded = Path(mlflow.artifacts.download_artifacts(tiny_model_uri, dst_path=tmp_path))
    (checkpoint,) = downloaded.rglob("*.pt")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(code), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            signature=signature(), input_example=input_example(),
            pip_requirements=pip_requirements())
    code.unlink()  # MLflow runs the logged copy
    inputs = {key: [tiny_pair[key]] for key in ("fixed", "moving", "moving_label")}
    old = mlflow.pyfunc.load_model(info.model_uri).predict(inputs)
    current = tiny_model.predict(inputs)
    for field in ("ddf", "warped", "warped_label"):
        channels = field != "warped"
        np.testing.assert_array_equal(decode_volume(old[field][0], field, channels)[0],
                                      decode_volume(current[field][0], field, channels)[0])


def test_one_hot_label_is_warped_channel_by_channel(app_url, tiny_pair, tiny_registrar):
    one_hot = np.stack([tiny_pair["label"] == value for value in (0, 1, 2)])  # (3, D, H, W)
    label = served_label(app_url, tiny_pair, one_hot)  # sent as NIfTI (D, H, W, 3)
    assert label.shape == (3, 16, 24, 16)
    assert set(np.unique(label)) == {0.0, 1.0}  # one-hot: no rounding to class indices
    assert label.sum(0).max() == 1.0  # channels still share each voxel
    assert (label.sum(0) == 1.0).mean() > 0.99
    local = tiny_registrar.register_volumes(
        *tiny_volumes(tiny_pair),
        Volume(np.moveaxis(one_hot, 0, -1).astype(np.uint8), tiny_pair["affine"], "label"))
    np.testing.assert_array_equal(label, np.moveaxis(local["warped_label"], -1, 0))
    index_map = served_label(app_url, tiny_pair, tiny_pair["label"])[0]  # values 0, 1, 2
    for value in (1, 2):
        assert np.mean(label[value] != (index_map == value)) < 1e-3


def test_integer_label_map_keeps_its_values(app_url, tiny_pair, tiny_registrar):
    label_map = (100 * tiny_pair["label"]).astype(np.uint8)  # values 0, 100, 200
    label = served_label(app_url, tiny_pair, label_map)
    assert label.shape == (1, 16, 24, 16)
    assert set(np.unique(label)) == {0.0, 100.0, 200.0}
    local = tiny_registrar.register_volumes(
        *tiny_volumes(tiny_pair), Volume(label_map, tiny_pair["affine"], "label"))
    assert set(np.unique(local["warped_label"])) == {0, 100, 200}
    dice = metrics.dice(local["warped_label"], label[0], labels=[100, 200])
    print(f"\nlabel map 0/100/200: Dice served vs in-process {np.round(dice, 4).tolist()}")
    assert dice.min() > 0.99


def test_soft_label_comes_back_soft(app_url, tiny_pair, tiny_registrar):
    soft = np.exp(-(tiny_pair["distance"] / 4) ** 2).astype(np.float32)  # in (0, 1]
    label = served_label(app_url, tiny_pair, soft)
    assert label.shape == (1, 16, 24, 16)
    assert 0.0 <= label.min() and label.max() <= 1.0
    between = np.mean((label > 0.01) & (label < 0.99))
    print(f"\nsoft label: {100 * between:.1f} % of the warped voxels strictly inside (0, 1)")
    assert between > 0.1
    local = tiny_registrar.register_volumes(
        *tiny_volumes(tiny_pair), Volume(soft, tiny_pair["affine"], "label"))
    np.testing.assert_allclose(label[0], local["warped_label"], atol=1e-6)


@pytest.mark.parametrize("field", ["fixed", "moving"])
def test_constant_image_is_422_nothing_to_register(app_url, tiny_pair, field):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]]}
    inputs[field] = [encode_volume(np.full((16, 24, 16), 0.5, np.float32), tiny_pair["affine"])]
    message = error_answer(app_url, inputs, 422)
    assert message == f"inputs.{field}[0]: nothing to register (the image is constant)"


def test_served_warped_equals_the_warp_cli_on_the_served_ddf(app_url, tiny_pair, tmp_path):
    """A moving image with a smaller field of view than the fixed one: the served DDF points
    outside the moving grid, where `regflow warp` and the server must both read zeros."""
    moving = tiny_pair["moving_array"][3:13, 5:19, 3:13]  # (10, 14, 10) of the (16, 24, 16)
    moving_affine = tiny_pair["affine"].copy()
    moving_affine[:3, 3] = [4.5, 5.0, 6.0]  # the crop where it lies in world space
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [encode_volume(moving, moving_affine)]}
    status, body = post(app_url, {"inputs": inputs})
    assert status == 200, body
    ddf, ddf_affine, _ = decode_volume(body["predictions"]["ddf"][0], "ddf", channels=True)
    warped = decode_volume(body["predictions"]["warped"][0], "warped")[0]
    targets = np.indices(ddf.shape[1:]) + ddf  # (3, *S_fixed) moving voxels
    upper = np.array(moving.shape)[:, None, None, None] - 1
    outside = ((targets < -1) | (targets > upper + 1)).any(0)
    inside = ((targets >= 0) & (targets <= upper)).all(0)
    print(f"\nserved DDF: {100 * outside.mean():.1f} % of the fixed voxels map more than a "
          f"voxel outside the moving grid, {100 * inside.mean():.1f} % inside it")
    assert outside.mean() > 0.1 and inside.mean() > 0.1
    write_nifti(tmp_path / "moving.nii.gz", moving, moving_affine)
    write_nifti(tmp_path / "ddf.nii.gz", np.moveaxis(ddf, 0, -1), ddf_affine)
    result = subprocess.run(
        [sys.executable, "-m", "regflow.cli", "warp", "--image", str(tmp_path / "moving.nii.gz"),
         "--ddf", str(tmp_path / "ddf.nii.gz"), "--out", str(tmp_path / "warped.nii.gz")],
        capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    cli_warped, cli_affine = read_volume(tmp_path / "warped.nii.gz")
    np.testing.assert_allclose(cli_affine, tiny_pair["affine"])
    assert np.all(warped[outside] == 0) and np.abs(warped[inside]).max() > 0.5
    np.testing.assert_allclose(cli_warped, warped, atol=1e-5)


@pytest.mark.parametrize("label", [None, [None]], ids=["null-field", "null-entry"])
def test_null_label_is_no_label(app_url, tiny_pair, label):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]],
              "moving_label": label}
    status, body = post(app_url, {"inputs": inputs})
    assert status == 200, body
    assert sorted(body["predictions"]) == ["ddf", "warped"]


def test_unknown_field_is_400_naming_it(app_url, tiny_pair):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]],
              "moving_labels": [tiny_pair["moving_label"]]}
    message = error_answer(app_url, inputs, 400)
    assert message == ("inputs: unknown field(s) moving_labels; "
                       "expected fixed, moving, moving_label, refine_steps")


def test_unknown_column_of_a_dataframe_request_is_400(app_url, tiny_pair):
    body = {"dataframe_split": {"columns": ["fixed", "moving", "mask"],
                                "data": [[tiny_pair["fixed"], tiny_pair["moving"], "x"]]}}
    status, answer = post_raw(app_url, json.dumps(body).encode())
    assert status == 400
    assert json.loads(answer)["message"].startswith("inputs: unknown field(s) mask;")


def test_volume_over_the_voxel_limit_is_413_naming_the_variable(app_url, tiny_pair):
    big = encode_volume(np.zeros((33, 32, 32), np.float32))  # 33,792 > 32^3 voxels
    message = error_answer(app_url, {"fixed": [tiny_pair["fixed"]], "moving": [big]}, 413)
    assert message == ("inputs.moving[0]: shape (33, 32, 32) is 33,792 voxels, over the limit of "
                       "32,768 per volume (REGFLOW_MAX_VOXELS)")


def test_too_many_pairs_is_413_naming_the_variable(app_url, tiny_pair):
    inputs = {"fixed": [tiny_pair["fixed"]] * 3, "moving": [tiny_pair["moving"]] * 3}
    message = error_answer(app_url, inputs, 413)
    assert message == ("inputs: 3 pairs, over the limit of 2 per request (REGFLOW_MAX_PAIRS); "
                       "send several requests")


def test_gzip_bomb_is_413_and_its_body_is_small(app_url, tiny_pair):
    header = nib.Nifti1Image(np.zeros((16, 24, 16), np.float32), np.eye(4)).to_bytes()
    bomb = base64.b64encode(gzip.compress(header + b"\0" * 2**24, compresslevel=9)).decode()
    message = error_answer(app_url, {"fixed": [tiny_pair["fixed"]], "moving": [bomb]}, 413)
    assert message.startswith("inputs.moving[0]: gzip data inflates past the 24,928 bytes")


def test_malformed_volume_is_400_without_the_request_in_the_body(app_url, tiny_pair):
    text = base64.b64encode(b"not an image, " * 100_000).decode()
    message = error_answer(app_url, {"fixed": [tiny_pair["fixed"]], "moving": [text]}, 400)
    assert message == "inputs.moving[0]: not a .nii.gz, .nii or .npy volume"


@contextlib.contextmanager
def model_attribute(tiny_model, name: str, value):
    """Set an attribute of the served RegflowPythonModel for one test (the app shares it)."""
    python_model = tiny_model.unwrap_python_model()
    kept = getattr(python_model, name)
    setattr(python_model, name, value)
    try:
        yield
    finally:
        setattr(python_model, name, kept)


def test_internal_error_is_500_with_a_short_message_and_a_logged_traceback(
        app_url, tiny_model, tiny_pair, caplog):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]]}
    with model_attribute(tiny_model, "registrar", None), \
            caplog.at_level(logging.ERROR,
                            logger="regflow.serving.scoring_errors"):  # a bug: no network
        message = error_answer(app_url, inputs, 500)
    assert message == "internal error; see the server log"
    assert "Traceback" in caplog.text and "AttributeError" in caplog.text


def test_request_past_the_server_timeout_stops_before_its_next_pair(app_url, tiny_model,
                                                                    tiny_pair):
    inputs = {"fixed": [tiny_pair["fixed"]] * 2, "moving": [tiny_pair["moving"]] * 2}
    with model_attribute(tiny_model, "timeout_s", 0.0):
        message = error_answer(app_url, inputs, 504)
    assert message == ("inputs: stopped before pair 0: the request ran past the server's 0.0 s "
                       "timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)")


@pytest.mark.xfail(strict=True, reason="MLflow 3.17 quotes a body that is not valid JSON in its "
                   "400 answer (scoring_server._decode_json_input), before regflow sees it")
def test_invalid_json_answer_does_not_quote_the_body(app_url):
    status, body = post_raw(app_url, b"{" + b"x" * 100_000)
    assert status == 400
    assert len(body) < MAX_ERROR_BODY, len(body)


# Round two: limits on what is computed, per-request refinement, geometry, the memory budget and
# the admission of request bodies (regflow.serving.app) in front of the same scoring app.

def test_refine_steps_is_applied_and_reported_and_its_absence_changes_nothing(
        app_url, tiny_pair, tiny_registrar):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]]}
    status, plain = post(app_url, {"inputs": inputs})
    assert status == 200 and sorted(plain["predictions"]) == ["ddf", "warped"]
    status, body = post(app_url, {"inputs": {**inputs, "refine_steps": 0}})
    assert status == 200, body
    predictions = body["predictions"]
    assert sorted(predictions) == ["ddf", "refine_steps", "time_s", "warped"]
    assert predictions["refine_steps"] == [0]
    assert 0 < predictions["time_s"][0] < 30
    assert predictions["ddf"] == plain["predictions"]["ddf"]  # the tiny model refines 0 steps
    local = tiny_registrar.register_volumes(*tiny_volumes(tiny_pair), refine_steps=0)
    ddf = decode_volume(predictions["ddf"][0], "ddf", channels=True)[0]
    np.testing.assert_allclose(ddf, local["ddf"], atol=1e-5)


@pytest.mark.parametrize(("steps", "status", "message"), [
    (5, 413, "inputs.refine_steps: 5 steps, over the limit of 0 (REGFLOW_MAX_REFINE_STEPS)"),
    ("many", 400, "inputs.refine_steps: expected a non-negative integer (0: the network alone), "
                  "got 'many'"),
    (-1, 400, "inputs.refine_steps: expected a non-negative integer (0: the network alone), "
              "got '-1'"),
    ([0, 0], 400, "inputs.refine_steps: 2 values but inputs.fixed has 1; give one integer, or "
                  "one per pair"),
])
def test_refine_steps_out_of_bounds_are_refused(app_url, tiny_pair, steps, status, message):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]],
              "refine_steps": steps}
    assert error_answer(app_url, inputs, status) == message


def test_coarse_voxels_are_refused_for_the_shape_they_would_be_resampled_to(app_url, tiny_pair):
    coarse = encode_volume(tiny_pair["fixed_array"], np.diag([10.0, 10.0, 10.0, 1.0]))
    message = error_answer(app_url, {"fixed": [tiny_pair["fixed"]], "moving": [coarse]}, 413)
    assert message.startswith("inputs.moving[0]: resampled to the model's ")
    assert message.endswith("over the limit of 32,768 per volume (REGFLOW_MAX_VOXELS)")


def test_a_label_map_with_more_values_than_channels_is_413(app_url, tiny_pair):
    label = (np.arange(16 * 24 * 16) % 1000).reshape(16, 24, 16).astype(np.int16)
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]],
              "moving_label": [encode_volume(label, tiny_pair["affine"])]}
    message = error_answer(app_url, inputs, 413)
    assert message == ("inputs.moving_label[0]: 999 distinct non-zero label values, over the "
                       "limit of 4 per volume (REGFLOW_MAX_CHANNELS)")


@pytest.mark.parametrize(("field", "volume", "message"), [
    ("fixed", lambda pair: sform_b64(pair["fixed_array"], zero_column()),
     "inputs.fixed[0]: zero voxel size along axis 1 (the affine's column 1 is zero)"),
    ("moving", lambda pair: encode_volume(np.random.default_rng(0).random((2, 2, 2))),
     "inputs.moving[0]: shape (2, 2, 2) is below the minimum of 8 voxels along axis 0 "
     "(REGFLOW_MIN_SIZE)"),
    ("moving", lambda pair: sform_b64(pair["moving_array"], np.diag([1.0, 1.0, np.nan, 1])),
     "inputs.moving[0]: the affine holds NaN or infinite values"),
], ids=["zero-column-sform", "2x2x2", "nan-affine"])
def test_bad_geometry_is_400_naming_the_field(app_url, tiny_pair, field, volume, message):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]]}
    inputs[field] = [volume(tiny_pair)]
    assert error_answer(app_url, inputs, 400) == message


def test_a_request_over_the_memory_budget_is_413_and_a_full_budget_is_503(
        app_url, tiny_model, tiny_pair):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]]}
    with model_attribute(tiny_model, "budget", MemoryBudget(2**20, 0.2, "REGFLOW_MAX_MEMORY")):
        message = error_answer(app_url, inputs, 413)
    assert message.startswith("inputs: needs about ") and message.endswith(
        "MiB of memory, over the 1 MiB a server worker may use (REGFLOW_MAX_MEMORY)")
    full = MemoryBudget(2**30, 0.2, "REGFLOW_MAX_MEMORY")
    taken = full.reserve(2**30, "another request")
    with model_attribute(tiny_model, "budget", full):
        message = error_answer(app_url, inputs, 503)
    assert message == ("inputs: the server's memory (REGFLOW_MAX_MEMORY) stayed taken for 0.2 s; "
                       "retry later")
    taken.release()
    assert full.free == 2**30


@pytest.fixture(scope="module")
def admitted_url(tiny_model):
    """The scoring app behind regflow serve's admission, bodies allowed 64 KiB (512 KiB of the
    2 MiB budget at 8 bytes per byte)."""
    limits = Limits(max_memory=2 * 2**20, queue_timeout_s=1.0)
    with serving_in_thread(Admission(scoring_server.init(tiny_model), limits)) as url:
        yield url


def test_admission_refuses_a_large_body_before_reading_it(admitted_url, tiny_pair):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]]}
    status, body = post(admitted_url, {"inputs": inputs})
    assert status == 200, body
    big = json.dumps({"inputs": {**inputs, "padding": "x" * 70_000}}).encode()
    status, answer = post_raw(admitted_url, big)
    assert status == 413
    assert json.loads(answer)["message"] == (
        "the request body: 0 MiB, over the 0 MiB a server worker accepts (REGFLOW_MAX_MEMORY: "
        "parsing a body takes 8 bytes per byte, and bodies may hold a quarter of it)")


def test_admission_asks_for_the_length_of_a_chunked_body(admitted_url):
    connection = http.client.HTTPConnection(admitted_url.removeprefix("http://"), timeout=10)
    connection.request("POST", "/invocations", body=iter([b'{"inputs": {}}']),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    answer = connection.getresponse()
    assert answer.status == 411
    assert json.loads(answer.read())["message"] == (
        "the request body: no Content-Length; send it with its length")
    connection.close()


def test_admitted_bodies_one_at_a_time_are_all_answered(admitted_url, tiny_pair):
    inputs = {"fixed": [tiny_pair["fixed"]], "moving": [tiny_pair["moving"]]}
    body = json.dumps({"inputs": inputs}).encode()
    assert 8 * len(body) > 2**19 // 2, "two such bodies must not fit at once"
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: post(admitted_url, {"inputs": inputs}), range(4)))
    assert [status for status, _ in answers] == [200] * 4
    assert all(answer == answers[0][1] for _, answer in answers)
