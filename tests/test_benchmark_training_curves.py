import csv

import mlflow
from click.testing import CliRunner

from benchmarks.training_curves import main


def logged_run(name: str, dice: list[float]) -> str:
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags({"git.commit": "0123456789abcdef", "regflow.config_digest": "d1"})
        for index, value in enumerate(dice, start=1):
            mlflow.log_metrics({"val/dice_mean": value, "val/dice/anterior": value - 0.01,
                                "val/sdlogj": 0.1, "train/total": -value}, step=100 * index)
    return run.info.run_id


def test_curves_are_copied_per_validation_and_a_rerun_replaces_only_its_run(tmp_path,
                                                                            mlflow_store):
    first, second = logged_run("a", [0.5, 0.6]), logged_run("b", [0.7])
    output = tmp_path / "curves.csv"
    runner = CliRunner()
    for spec in (f"a={first}", f"b={second}@ignored", f"a={first}"):
        result = runner.invoke(main, ["--tracking-uri", mlflow_store, "--run", spec,
                                      "-o", str(output)])
        assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(output.open()))
    assert [(row["run_name"], row["step"], row["dice_mean"]) for row in rows] == [
        ("b", "100", "0.7000"), ("a", "100", "0.5000"), ("a", "200", "0.6000")]
    assert rows[0]["config_digest"] == "d1" and rows[0]["commit"] == "0123456789"
    assert rows[1]["dice_anterior"] == "0.4900" and "total" not in rows[0]
