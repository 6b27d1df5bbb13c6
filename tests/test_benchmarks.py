"""Tests for benchmarks.core: one tiny row end to end, the JSON schema, MONAI optional."""

import json

import pytest
import torch

from benchmarks import core, records

FIELDS = {"name", "size", "regflow_s", "monai_s", "ratio", "regflow_peak_mb", "monai_peak_mb"}


def test_one_row_without_monai_writes_the_json_schema(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert core.main(["--sizes", "16", "--repeats", "1", "--rows", "bending_energy",
                      "--no-monai", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == FIELDS
    assert (row["name"], row["size"]) == ("bending_energy", 16)
    assert row["regflow_s"] > 0
    assert row["regflow_peak_mb"] >= 0
    assert row["monai_s"] is row["ratio"] is row["monai_peak_mb"] is None
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split() == ["name", "size", "regflow_s", "monai_s", "ratio",
                                "regflow_peak_mb", "monai_peak_mb"]
    assert table[1].split()[:2] == ["bending_energy", "16"]
    assert table[1].split()[3:5] == ["n/a", "n/a"]
    assert "MONAI" in captured.err  # says why the MONAI columns are empty


def test_results_file_keeps_other_rows_and_records_provenance(tmp_path):
    path = tmp_path / "speed.json"
    records.upsert(path, [{"name": "warp", "size": 16, "regflow_s": 9.0},
                          {"name": "bending_energy", "size": 16, "regflow_s": 9.0}],
                   key_fields=("name", "size"))
    assert core.main(["--sizes", "16", "--repeats", "1", "--rows", "bending_energy",
                      "--no-monai", "--results", str(path), "--machine-note", "a test"]) == 0
    rows = records.read(path)["rows"]
    assert [(row["name"], row["size"]) for row in rows] == [("warp", 16), ("bending_energy", 16)]
    assert rows[0]["regflow_s"] == 9.0 and 0 < rows[1]["regflow_s"] < 9.0
    assert rows[1]["commit"] and rows[1]["date"].endswith("Z")
    assert rows[1]["machine"].startswith(f"{core.THREADS} threads")
    assert rows[1]["machine"].endswith("--no-monai; a test")


def test_measure_one_reports_the_extra_memory_of_a_call():
    result = core.measure_one("warp", 16, "regflow")
    assert set(result) == {"row", "size", "impl", "peak_mb", "seconds"}
    assert 0 <= result["peak_mb"] < 200  # a 2 x 16^3 warp needs well under 1 MiB of tensors
    assert result["seconds"] > 0


def test_every_regflow_row_runs_at_a_tiny_size():
    inputs = core.make_inputs(16)
    for row in core.ROWS:
        output = core.regflow_case(row, inputs)()
        assert torch.isfinite(output).all(), row


def test_inputs_are_images_in_unit_range_and_a_bounded_ddf():
    inputs = core.make_inputs(16)
    assert inputs["fixed"].shape == inputs["moving"].shape == (core.BATCH, 1, 16, 16, 16)
    assert inputs["ddf"].shape == (core.BATCH, 3, 16, 16, 16)
    assert 0 <= inputs["fixed"].min() and inputs["moving"].max() <= 1
    assert inputs["ddf"].abs().max() <= 3


def test_table_formats_missing_values_as_na():
    rows = [{"name": "warp", "size": 16, "regflow_s": 0.01, "monai_s": None, "ratio": None,
             "regflow_peak_mb": 1.0, "monai_peak_mb": None}]
    assert core.format_table(rows).splitlines()[1].split() == ["warp", "16", "0.0100", "n/a",
                                                                "n/a", "1", "n/a"]


@pytest.mark.slow
def test_monai_warp_matches_regflow_on_the_benchmark_inputs():
    """The warp row compares like with like: same DDF convention, zeros padding (imports MONAI)."""
    from monai.networks.blocks import Warp

    from regflow.spatial import warp

    inputs = core.make_inputs(16)
    expected = warp(inputs["moving"], inputs["ddf"])
    assert (expected == 0).any()  # some samples fall outside the volume
    actual = Warp(mode="bilinear", padding_mode="zeros")(inputs["moving"], inputs["ddf"])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
