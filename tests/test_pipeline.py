import csv
import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from regflow import experiment_page
from regflow.config import load_config
from regflow.errors import RegflowError
from regflow.inference import load_registrar
from regflow.predict import predict_split
from regflow.stages import evaluate_stage, train_stage


def test_train_evaluate_predict_on_tiny_data(tiny_project):
    config = load_config(tiny_project)
    result = train_stage(config)
    headline = evaluate_stage(config)
    registrar = load_registrar(str(result.best_checkpoint), config)
    written = predict_split(registrar, config, Path("data/processed/tiny/manifest.json"), "test",
                            Path("predicted"), learn2reg=True)

    metrics = json.loads(Path("metrics/eval.json").read_text())
    assert metrics == headline
    for key in ("dice_mean", "dice_mean_before", "hd95_mean", "centroid_distance_mm", "folding_pct",
                "sdlogj", "time_ms_per_pair", "dice_first", "dice_second"):
        assert key in metrics, key
    assert metrics["pairs"] == 2
    with open("metrics/pairs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["method"] for row in rows) == ["none", "none", "regflow", "regflow"]
    for plot in ("dice_per_label.csv", "dice_per_label.png", "training_curve.csv",
                 "training_curve.png"):
        assert Path("plots", plot).stat().st_size > 0, plot

    manifest = json.loads(Path("data/processed/tiny/manifest.json").read_text())
    cases = {case["case_id"]: case for case in manifest["cases"]}
    ddf_files = sorted(Path("eval/tiny").glob("*_ddf.nii.gz"))
    assert len(ddf_files) == 2
    fixed_id = ddf_files[0].name.split("__")[0]
    fixed_affine = nib.load(Path("data/processed/tiny") / cases[fixed_id]["image"]).affine
    ddf = nib.load(ddf_files[0])
    assert ddf.shape == (16, 24, 16, 3)
    np.testing.assert_allclose(ddf.affine, fixed_affine)

    run = mlflow.get_run(result.run_id)
    assert run.data.metrics["eval/dice_mean"] == metrics["dice_mean"]
    # the MLflow UI's runs view of regflow's experiment shows metrics this run has
    assert set(experiment_page.COLUMNS) <= set(run.data.metrics)
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags[experiment_page.KIND_TAG] == "custom_model_development"
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(result.run_id,
                                                                           "evaluation")}
    assert {"evaluation/metrics", "evaluation/plots", "evaluation/volumes"} <= artifacts

    names = {path.name for path in written}
    assert "metrics.csv" in names
    assert sum(name.startswith("disp_") for name in names) == 2


def test_evaluate_names_a_lost_training_run_before_any_work(tiny_project):
    config = load_config(tiny_project, ["train.steps=2", "train.val_every=2"])
    train_stage(config)
    record = Path("models/tiny/run.json")
    record.write_text(json.dumps({**json.loads(record.read_text()), "run_id": "0" * 32}))
    with pytest.raises(RegflowError, match=r"MLflow run 0{32}: not found in sqlite"):
        evaluate_stage(config)
    assert not Path("metrics/eval.json").exists()
    assert not Path("eval/tiny").exists()
