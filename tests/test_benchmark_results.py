"""Tests for benchmarks.results: docs/results.md and the README summary from a small results
file (rows, commit, digest, the published reference), idempotence, and the README block."""

import pytest
from click.testing import CliRunner

from benchmarks import records, results
from regflow.errors import RegflowError


def _row(method, settings, dice, commit="abc1234", digest="0123456789abcdef", **extra):
    return {"split": "test", "method": method, "settings": settings, "pairs": 40,
            "split_pairs": 40, "dice": {"anterior": dice + 0.01, "posterior": dice - 0.01},
            "dice_mean": dice, "dice_sd": 0.04, "dice30": dice - 0.02, "hd95_mm": 2.5,
            "sdlogj": 0.09, "folding_pct": 0.1, "seconds_per_pair": 1.5, "commit": commit,
            "config_digest": digest, "date": "2026-12-07T20:00Z", "machine": "2 threads, idle",
            "model": "", "notes": "", **extra}


ROWS = [_row("no registration", "identity (zero field)", 0.581, seconds_per_pair=0.0),
        _row("SimpleITK demons", "tuned on val", 0.788, pairs=12),
        _row("regflow classical", "model none, 150 steps", 0.802),
        _row("default", "1 pass, network", 0.796, commit="def5678+dirty",
             digest="fedcba9876543210", model="models/hippocampus/best.pt sha256:096d6ee16047"),
        _row("default", "1 pass, +100 refinement steps", 0.811, commit="def5678+dirty",
             digest="fedcba9876543210"),
        _row("long", "3 passes, network", 0.856)]
README = ("# regflow\n\nIntro.\n\n" + results.BEGIN + "\nold summary\n" + results.END
          + "\n\n## Install\n\nText after.\n")


@pytest.fixture
def project(tmp_path):
    records.upsert(tmp_path / "results" / "accuracy.json", ROWS)
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def test_results_page_has_every_row_with_commit_digest_date_and_the_reference(project):
    page = results.render(results.read_results(project / "results"))
    lines = page.splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| method | settings | pairs | Dice anterior | Dice posterior | "
                               "Dice mean | Dice30 | HD95 (mm) | SDlogJ | folding % | s/pair | "
                               "commit | config | date |")
    assert ("| default | 1 pass, network | 40 | 0.806 | 0.786 | 0.796 ± 0.040 | 0.776 | 2.50 | "
            "0.090 | 0.100 | 1.50 | `def5678+dirty` | `fedcba9876543210` | 2026-12-07 |") in lines
    assert "| SimpleITK demons | tuned on val | 12 of 40 |" in page
    assert len(table) == 1 + len(ROWS) + 1  # header, the rows, the published reference
    assert table[-1].startswith("| Learn2Reg 2020 task 4, 3rd place (Estienne et al.) | "
                                "published on the challenge's own test set; not measured here")
    assert "| 0.85 | 0.84 | 1.51 | 0.09 |" in table[-1]
    assert "model `models/hippocampus/best.pt sha256:096d6ee16047`" in page
    assert "machine: 2 threads, idle" in page


def test_another_file_of_accuracy_rows_is_an_accuracy_table_without_the_reference(project):
    records.upsert(project / "results" / "amortised.json",
                   [_row("amortised, bending 2.0", "1 pass, network", 0.771)])
    page = results.render(results.read_results(project / "results"))
    section = page[page.index("## Amortised (test split)"):]
    assert "`python -m benchmarks.accuracy` (benchmarks/results/amortised.json)" in section
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(table) == 2 and table[-1].startswith("| amortised, bending 2.0 | 1 pass, "
                                                        "network | 40 | 0.781 | 0.761 |")
    assert page.count("Learn2Reg 2020 task 4, 3rd place") == 1


def test_a_plain_results_file_shows_its_columns_in_its_own_order(project):
    rows = [{"zone": "b", "answer": "413 in 0.1 s", "date": "2026-12-07T20:00Z"},
            {"zone": "a", "answer": "200 in 2 s", "extra": 1.5, "date": "2026-12-07T20:00Z"}]
    records.upsert(project / "results" / "serving.json", rows, key_fields=("zone",),
                   columns=("zone", "answer"))
    page = results.render(results.read_results(project / "results"))
    section = page[page.index("## Serving"):].splitlines()
    assert "| zone | answer | extra | date |" in section
    assert "| a | 200 in 2 s | 1.5000 | 2026-12-07T20:00Z |" in section


def test_summary_has_five_lines_best_methods_first(project):
    lines = results.summary_lines(ROWS)
    assert len(lines) == 5
    assert [line.split(" (")[0] for line in lines[:4]] == [
        "- long", "- default", "- regflow classical", "- SimpleITK demons"]
    assert "default (1 pass, +100 refinement steps): test Dice 0.811" in lines[1]
    assert "on 12 of 40 pairs" in lines[3]
    assert lines[4].startswith("- No registration: Dice 0.581. Published reference, not "
                               "measured here")
    assert "[docs/results.md](docs/results.md)" in lines[4]


def test_generate_is_idempotent_and_replaces_only_the_readme_block(project):
    output, readme = project / "docs" / "results.md", project / "README.md"
    changed = results.generate(project / "results", output, readme)
    assert changed == [output, readme]
    text = readme.read_text()
    before, block, after = (text.split(results.BEGIN)[0], text.split(results.BEGIN)[1]
                            .split(results.END)[0], text.split(results.END)[1])
    assert before == "# regflow\n\nIntro.\n\n" and after == "\n\n## Install\n\nText after.\n"
    assert block.strip().splitlines() == results.summary_lines(ROWS, "docs/results.md")
    page = output.read_text()
    assert results.generate(project / "results", output, readme) == []
    assert output.read_text() == page and readme.read_text() == text

    records.upsert(project / "results" / "accuracy.json",
                   [_row("long", "3 passes, network", 0.861, commit="9999999")])
    assert results.generate(project / "results", output, readme) == [output, readme]
    assert "`9999999`" in output.read_text() and "test Dice 0.861" in readme.read_text()
    assert "test Dice 0.856" not in output.read_text()


def test_readme_without_markers_is_left_alone_and_half_markers_fail(project):
    readme = project / "README.md"
    readme.write_text("# regflow\n")
    results.generate(project / "results", project / "docs" / "results.md", readme)
    assert readme.read_text() == "# regflow\n"
    with pytest.raises(RegflowError, match="README.md: needs"):
        results.replace_block(results.END + "\n" + results.BEGIN, ["x"])
    readme.write_text(results.BEGIN + "\n")
    result = CliRunner().invoke(results.main, ["--results-dir", str(project / "results"),
                                               "--output", str(project / "results.md"),
                                               "--readme", str(readme)])
    assert result.exit_code == 2 and "needs" in result.output


def test_other_json_and_csv_results_files_get_a_table_of_their_columns(project):
    records.upsert(project / "results" / "speed.json",
                   [{"name": "warp", "size": 64, "regflow_s": 0.0123456, "commit": "abc1234",
                     "date": "2026-12-07T20:00Z", "machine": "2 threads"}],
                   key_fields=("name", "size"))
    (project / "results" / "training_curves.csv").write_text(
        "run_name,run_id,commit,config_digest,date,step,dice_mean\n"
        "base,r1,378bd7c20b,3952bff6f413ee2d,2026-12-07,300,0.7188\n")
    (project / "results" / "notes.txt").write_text("not a results file")
    page = results.render(results.read_results(project / "results"))
    assert "## Speed\n\n(benchmarks/results/speed.json)" in page
    assert "| name | regflow_s | size | commit | date | machine |" in page
    assert "| warp | 0.0123 | 64 | abc1234 | 2026-12-07T20:00Z | 2 threads |" in page
    assert "## Training curves\n\n(benchmarks/results/training_curves.csv)" in page
    assert "| run_name | run_id | step | dice_mean | commit | config_digest | date |" in page
    assert "| base | r1 | 300 | 0.7188 | 378bd7c20b | 3952bff6f413ee2d | 2026-12-07 |" in page
    assert "not a results file" not in page
