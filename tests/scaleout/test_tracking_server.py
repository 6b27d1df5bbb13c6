"""train, evaluate, register, serve against `mlflow server` on PostgreSQL (proxied artifacts)."""

from __future__ import annotations

import subprocess

import mlflow
import nibabel as nib
import numpy as np
import pytest

from tests.scaleout.conftest import (
    free_port,
    project_env,
    run_checked,
    stop_process_group,
    wait_for_http,
)

pytestmark = pytest.mark.slow

MODEL = "regflow"
LOCAL_STORES = ("mlflow.db", "mlruns", "mlartifacts")


def test_every_stage_and_the_model_server_use_the_tracking_server(mlflow_server, project,
                                                                   tiny_raw):
    env = project_env(mlflow_server.url)
    run_checked(["regflow", "train"], project, env)
    run_checked(["regflow", "evaluate"], project, env)
    decision = run_checked(["regflow", "register"], project, env)
    assert f"{MODEL} version 1 is now @champion" in decision

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    version = client.get_model_version_by_alias(MODEL, "champion")
    run_info = client.get_run(version.run_id).info
    assert run_info.artifact_uri.startswith("mlflow-artifacts:")
    stored = {path.name for path in mlflow_server.artifacts.rglob("*") if path.is_file()}
    assert {"MLmodel", "params.yaml"} <= stored, sorted(stored)
    assert any(name.endswith(".pt") for name in stored), sorted(stored)

    port = free_port()
    log = project / "serve.log"
    with open(log, "wb") as handle:
        server = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
             "local", "--host", "127.0.0.1", "--port", str(port)],
            cwd=project, env=env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, log, 120)
        fixed, moving = (tiny_raw / "test/images" / f"case_{number:03d}.nii.gz"
                         for number in (8, 9))
        label = tiny_raw / "test/labels/case_009.nii.gz"
        pair = ["--fixed", str(fixed), "--moving", str(moving), "--moving-label", str(label)]
        run_checked(["regflow", "request", f"http://127.0.0.1:{port}", *pair, "--out", "served"],
            project, env)
    finally:
        stop_process_group(server)
    run_checked(["regflow", "predict", "--model", "models/tiny/best.pt", *pair, "--out", "local"],
        project, env)

    served = nib.load(project / "served/ddf.nii.gz")
    local = nib.load(project / "local/ddf.nii.gz")
    assert served.shape == nib.load(fixed).shape + (3,)
    np.testing.assert_allclose(served.get_fdata(), local.get_fdata(), atol=1e-4)
    np.testing.assert_allclose(served.affine, nib.load(fixed).affine)
    assert (project / "served/warped_label.nii.gz").exists()
    for name in LOCAL_STORES:
        assert not (project / name).exists(), f"{name} written in the project folder"
