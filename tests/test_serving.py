"""End to end: train on real hippocampus data, register, serve with `mlflow models serve`."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from regflow import metrics
from regflow.codec import decode_volume, encode_volume
from regflow.config import load_config
from regflow.data.io import read_volume
from regflow.data.preprocess import preprocess_dataset
from regflow.data.sources import fetch_dataset
from regflow.models import RegistrationModel
from regflow.pipeline import evaluate_stage, train_stage
from regflow.predict import (
    RawVolume,
    ddf_on_original_grid,
    prepare_image,
    preprocess_params,
    register_pair,
    warp_raw,
)
from regflow.registry import register_stage

pytestmark = pytest.mark.slow

DATASET = "msd-hippocampus"
LABELS = [1, 2]
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
        fetch_dataset(DATASET, config, mirror=str(mirror))
        preprocess_dataset(DATASET, config)
        train_stage(config)
        headline = evaluate_stage(config)
        decision = register_stage(config)
        print(f"\nfixture: fetch+preprocess+train({TRAIN_STEPS} steps)+evaluate+register "
              f"{time.monotonic() - started:.1f} s; test-split Dice "
              f"{headline['dice_mean_before']:.3f} -> {headline['dice_mean']:.3f}")
        assert decision["champion"], decision
        manifest = json.loads((work / "data/processed" / DATASET / "manifest.json").read_text())
        yield {"name": name, "work": work, "config": config, "headline": headline,
               "manifest": manifest, "checkpoint": work / "models/hippocampus/best.pt",
               "raw": Path(mirror) / "Task04_Hippocampus"}


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


@pytest.fixture(scope="module")
def server(champion, mlflow_store):
    """`mlflow models serve -m models:/<name>@champion` on a free loopback port."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = champion["work"] / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m",
             f"models:/{champion['name']}@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}: "
                            f"{log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - started > PING_TIMEOUT_S:
                pytest.fail(f"no /ping in {PING_TIMEOUT_S} s: {log_path.read_text()[-2000:]}")
            time.sleep(0.25)
        print(f"\nserver up on /ping in {time.monotonic() - started:.1f} s")
        yield url
    finally:
        stop(process)


def post(url: str, payload: dict) -> tuple[int, dict]:
    """POST JSON to /invocations: (HTTP status, parsed body)."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


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
    cases = [case["case_id"] for case in champion["manifest"]["cases"]
             if case["split"] == "test"]
    _, extra = RegistrationModel.load(champion["checkpoint"])
    fixed_id = cases[0]
    fixed = RawVolume.read(raw_paths(champion, fixed_id)[0])
    fixed_label = RawVolume.read(raw_paths(champion, fixed_id)[1])
    candidates = {}
    for case_id in cases[1:]:
        image = RawVolume.read(raw_paths(champion, case_id)[0])
        if image.array.shape != fixed.array.shape:
            label = RawVolume.read(raw_paths(champion, case_id)[1])
            before = unregistered_label(extra["preprocessing"], fixed, image, label)
            candidates[case_id] = mean_dice(fixed_label.array, before)
    moving_id = min(candidates, key=candidates.get)
    volumes = {}
    for role, case_id in (("fixed", fixed_id), ("moving", moving_id)):
        image_path, label_path = raw_paths(champion, case_id)
        volumes[role] = RawVolume.read(image_path)
        volumes[f"{role}_label"] = RawVolume.read(label_path)
        volumes[f"{role}_path"], volumes[f"{role}_label_path"] = image_path, label_path
    volumes["payload"] = {"inputs": {"fixed": [b64_file(volumes["fixed_path"])],
                                     "moving": [b64_file(volumes["moving_path"])],
                                     "moving_label": [b64_file(volumes["moving_label_path"])]}}
    return volumes


def unregistered_label(record: dict, fixed: RawVolume, moving: RawVolume,
                       moving_label: RawVolume) -> np.ndarray:
    """The moving label on the fixed grid with a zero DDF between the processed grids."""
    params = preprocess_params(record)
    _, fixed_map = prepare_image(fixed, params)
    _, moving_map = prepare_image(moving, params)
    zero = np.zeros((3, *params.shape), np.float32)
    identity = ddf_on_original_grid(zero, fixed_map, moving_map, fixed.array.shape)
    return warp_raw(moving_label.array, identity, nearest=True)


def mean_dice(fixed_label: np.ndarray, label: np.ndarray) -> float:
    return float(metrics.dice(fixed_label, label, labels=LABELS).mean())


def decode_answer(body: dict, index: int = 0) -> dict[str, tuple]:
    predictions = body["predictions"]
    return {field: decode_volume(values[index], field, channels=field != "warped")
            for field, values in predictions.items() if values[index] is not None}


@pytest.fixture(scope="module")
def single_answer(server, pair):
    status, body = post(server, pair["payload"])
    assert status == 200, body
    return decode_answer(body)


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
    _, extra = RegistrationModel.load(champion["checkpoint"])
    before = unregistered_label(extra["preprocessing"], pair["fixed"], pair["moving"],
                                pair["moving_label"])
    dice_before = mean_dice(pair["fixed_label"].array, before)
    dice_after = mean_dice(pair["fixed_label"].array, label[0])
    print(f"\npair {pair['fixed_path'].name} <- {pair['moving_path'].name}: Dice over labels "
          f"1,2 without registration {dice_before:.3f}, served registration {dice_after:.3f}")
    assert dice_after > dice_before + 0.05


def test_served_answer_matches_in_process_registration_and_latency(champion, server, pair,
                                                                   single_answer):
    model, extra = RegistrationModel.load(champion["checkpoint"])
    record = extra["preprocessing"]
    label = RawVolume(pair["moving_label"].array[..., None].astype(np.float32),
                      pair["moving_label"].affine, "label")
    local_times = []
    for _ in range(5):
        started = time.perf_counter()
        local = register_pair(model, record, pair["fixed"], pair["moving"], label)
        local_times.append(time.perf_counter() - started)
    np.testing.assert_allclose(single_answer["ddf"][0], local["ddf"], atol=1e-4)
    mismatch = np.mean(single_answer["warped_label"][0][0] != local["warped_label"][..., 0])
    assert mismatch < 1e-3, "nearest-neighbour labels may differ only at rounding ties"
    latencies = []
    for _ in range(20):
        started = time.perf_counter()
        status, _ = post(server, pair["payload"])
        latencies.append(time.perf_counter() - started)
        assert status == 200
    print(f"\nlatency for {pair['fixed'].array.shape} <- {pair['moving'].array.shape}: served "
          f"p50 {1000 * np.median(latencies):.0f} ms over 20 sequential requests (p90 "
          f"{1000 * np.percentile(latencies, 90):.0f} ms); in-process register_pair median "
          f"{1000 * np.median(local_times):.0f} ms")


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
def test_malformed_request_is_4xx_naming_the_field(server, pair, inputs, field, problem):
    fixed = pair["payload"]["inputs"]["fixed"]
    inputs = {key: fixed if value == "FIXED" else value for key, value in inputs.items()}
    status, body = post(server, {"inputs": inputs})
    assert 400 <= status < 500, body
    message = body.get("message", "")
    assert field in message, message
    assert problem in message or problem == "missing", message


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
