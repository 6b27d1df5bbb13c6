"""Tests for benchmarks.serving_attacks' results rows (the attacks themselves run against a real
server in tests/reliability)."""

from benchmarks import records
from benchmarks.serving_attacks import record_rows


def outcome(clients, statuses, seconds, peak, tripped=False):
    return {"clients": clients, "statuses": statuses, "seconds": seconds, "peak_rss_mb": peak,
            "guard_tripped": tripped, "message": "", "valid_after": True}


RESULTS = {
    "idle_rss_mb": 580, "idle_rss_mb_after": 1810,
    "attacks": [{"attack": "48^3 at 10 mm", "body_mb": 1.06,
                 "x1": outcome(1, [200], 22.5, 2500),
                 "x16": {**outcome(16, [0], 300.0, 8001, tripped=True), "valid_after": False}}],
    "latency": [{"refine_steps": 0, "status": 200, "client_p50_ms": 95.5, "server_p50_ms": 61.0,
                 "server_cpu_ms_per_request": 70.0},
                {"refine_steps": "default", "status": 200, "client_p50_ms": 1600.0,
                 "server_p50_ms": None, "server_cpu_ms_per_request": 2900.0}],
    "restart": [{"victim": "parent", "orphans_after_20s": 2, "orphans_gone_s": None,
                 "orphan_answers_ping": True, "restart": "failed", "restart_error": "in use"}],
}


def test_rows_say_status_time_memory_and_the_guard_of_each_burst():
    rows = {row["request"]: row for row in record_rows(RESULTS, "before (abc1234)")}
    assert {row["served"] for row in rows.values()} == {"before (abc1234)"}
    attack = rows["48^3 at 10 mm"]
    assert attack["once"] == "200 in 22.5 s, peak 2500 MB"
    assert attack["at_once"] == "16: none in 300 s, peak 8001 MB, guard: killed"
    assert attack["body_mb"] == 1.06 and attack["valid_answer_after"] == "no"
    assert rows["(idle, before and after the attacks)"]["once"] == "RSS 580 MB, then 1810 MB"
    assert rows["valid pair, refine_steps 0, in a row"]["once"] == (
        "200, p50 95.5 ms at the client, 61 ms on the server, 70 ms CPU")
    assert rows["valid pair, refine_steps default, in a row"]["once"] == (
        "200, p50 1600 ms at the client, 2900 ms CPU")
    assert rows["SIGKILL of the parent (2 workers), restart on the port"]["once"] == (
        "2 workers left after 20 s, answering /ping; restart failed")


def test_latency_rows_say_when_the_pair_was_timed_without_its_label():
    rows = record_rows({**RESULTS, "latency_inputs": "valid pair without its label"}, "after")
    assert "valid pair without its label, refine_steps 0, in a row" in {
        row["request"] for row in rows}


def test_a_second_label_adds_rows_and_a_rerun_replaces_its_own(tmp_path):
    path = tmp_path / "serving_attacks.json"
    for served in ("before (a)", "after (b)", "after (b)"):
        rows = record_rows(RESULTS, served)
        records.upsert(path, rows, key_fields=("served", "request"))
    table = records.read(path)["rows"]
    assert len(table) == 2 * len(rows)
    assert [row["served"] for row in table[:len(rows)]] == ["before (a)"] * len(rows)
