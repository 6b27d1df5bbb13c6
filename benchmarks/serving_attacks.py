"""Hostile requests against a served model: answer, time and the server's peak memory.

Run ``python -m benchmarks.serving_attacks --model URI --fixed F --moving M --moving-label L``
(see ``--help``): it starts ``regflow serve`` (the regflow found on ``--regflow``'s path, by
default this checkout's) on a free loopback port with one worker and the default limits, records
the answer to a valid request, then for every attack in :data:`ATTACKS` sends it once and
``--clients`` times at once, each burst followed by the valid request, whose answer must equal the
first one. For every burst it reports the HTTP statuses, the slowest answer and the peak resident
memory of the server's whole process tree (sampled every 10 ms); a server whose tree passes
``--guard-gb`` is killed (and restarted) rather than let it take the machine. It then times valid
requests at several ``refine_steps`` and SIGKILLs the server's supervisor, restarts it on the same
port and asks it again. The tables go to stdout (Markdown), the figures to ``--json``, and with
``--record`` the rows to a results file that ``python -m benchmarks.results`` renders into
docs/results.md (``--label`` names the served code: ``before``, ``after``).

``tests/reliability`` builds its hostile requests and measures memory with this module.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

from benchmarks import records

PING_TIMEOUT_S = 180
MIB_OF_ZEROS = gzip.compress(b"\0" * 2**20, compresslevel=9)  # about 1 KB
Inputs = dict[str, object]


def b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")


def nifti_b64(array: np.ndarray, affine: np.ndarray | None = None) -> str:
    """Base64 of a .nii.gz file of ``array`` (its own dtype) and ``affine`` (identity)."""
    image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    return b64(gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def nifti_gz_bomb(shape: tuple[int, ...], zeros_mib: int) -> str:
    """Base64 of a gzip file: a float32 NIfTI header declaring ``shape``, then ``zeros_mib`` MiB
    of zeros as 1 MiB gzip members (a valid multi-member gzip file, cheap to build)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_data_offset(352)
    return b64(gzip.compress(header.binaryblock + b"\0" * 4) + MIB_OF_ZEROS * zeros_mib)


def noise(shape: tuple[int, ...], seed: int, dtype: type = np.float32) -> np.ndarray:
    """Smooth-ish random intensities in [0, 100) (never constant)."""
    rng = np.random.default_rng(seed)
    return (100 * rng.random(shape)).astype(dtype)


def sform_b64(array: np.ndarray, affine: np.ndarray) -> str:
    """Base64 .nii.gz whose sform (code 1, no qform) is ``affine`` as it is, even a singular or
    non-finite one (which nibabel cannot store as a qform)."""
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_sform(affine, code=1)
    return b64(gzip.compress(nib.Nifti1Image(array, None, header).to_bytes(), mtime=0))


def zero_column(axis: int = 1) -> np.ndarray:
    """An identity affine whose voxel axis ``axis`` is zero (a degenerate sform)."""
    degenerate = np.eye(4)
    degenerate[:3, axis] = 0.0
    return degenerate


def attacks(valid: Inputs) -> dict[str, Callable[[], Inputs]]:
    """The hostile requests, built lazily from a valid request's images (base64 texts)."""
    fixed, moving = valid["fixed"][0], valid["moving"][0]
    shape = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(moving))).shape
    coarse = np.diag([10.0, 10.0, 10.0, 1.0])
    rng = np.random.default_rng(7)
    return {
        "48^3 at 10 mm (resampled 480^3)": lambda: {
            "fixed": [nifti_b64(noise((48,) * 3, 1), coarse)],
            "moving": [nifti_b64(noise((48,) * 3, 2), coarse)]},
        "label map with 1000 values": lambda: {
            "fixed": [fixed], "moving": [moving],
            "moving_label": [nifti_b64(rng.integers(0, 1000, shape).astype(np.int16))]},
        "gzip bomb, 256^3 header": lambda: {
            "fixed": [fixed], "moving": [nifti_gz_bomb((256,) * 3, 65)]},
        "gzip bomb, 64^3 header": lambda: {
            "fixed": [fixed], "moving": [nifti_gz_bomb((64,) * 3, 4096)]},
        "128^3 pair (fits the budget)": lambda: {
            "fixed": [nifti_b64(noise((128,) * 3, 9))],
            "moving": [nifti_b64(noise((128,) * 3, 10))]},
        "largest stored size, 256^3 int16": lambda: {
            "fixed": [nifti_b64(noise((256,) * 3, 3, np.int16))],
            "moving": [nifti_b64(noise((256,) * 3, 4, np.int16))]},
        "sform with a zero column": lambda: {
            "fixed": [sform_b64(noise((48,) * 3, 5), zero_column())], "moving": [moving]},
        "2x2x2 pair": lambda: {
            "fixed": [nifti_b64(noise((2, 2, 2), 6))], "moving": [nifti_b64(noise((2, 2, 2), 8))]},
        "valid pair (default refinement)": lambda: dict(valid),
    }


class PeakRss:
    """Samples the RSS of a process and all its descendants until stopped; keeps the peak.

    Args:
        pid: the tree's root.
        every_s: sampling period.
        guard: bytes; past it the tree is killed (SIGKILL to every process) and ``tripped`` set.
    """

    def __init__(self, pid: int, every_s: float = 0.01, guard: float | None = None) -> None:
        self.process, self.every_s, self.guard, self.peak = psutil.Process(pid), every_s, guard, 0
        self.tripped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def now(self) -> int:
        total = 0
        for process in self.tree():
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            if self.guard is not None and self.peak > self.guard and not self.tripped:
                self.tripped = True
                for process in self.tree():
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRss:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_raw(url: str, body: bytes, timeout: float = 900) -> tuple[int, bytes]:
    """POST a JSON body to /invocations: (HTTP status, raw body); status 0: no answer."""
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ConnectionError):
        return 0, b""


def pinging(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Server:
    """A running ``regflow serve``: its URL and process (the leader of its own session)."""

    url: str
    process: subprocess.Popen
    port: int


def start_server(model: str, port: int, log: Path, workers: int = 1, pythonpath: str = "",
                 env: dict[str, str] | None = None) -> Server:
    """``regflow serve --model MODEL`` on 127.0.0.1:PORT in its own session; waits for /ping."""
    environment = {**os.environ, **(env or {})}
    if pythonpath:
        environment["PYTHONPATH"] = pythonpath
    with log.open("ab") as out:
        process = subprocess.Popen(
            # run in the log's folder with -P: a working folder that is a checkout would shadow
            # PYTHONPATH's regflow (python -m and uvicorn both put it first on sys.path)
            [sys.executable, "-P", "-m", "regflow.cli", "serve", "--model", model, "--host",
             "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=log.resolve().parent)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    while not pinging(url):
        if process.poll() is not None or time.monotonic() - started > PING_TIMEOUT_S:
            stop_server(Server(url, process, port))
            raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.25)
    return Server(url, process, port)


def stop_server(server: Server) -> None:
    """SIGTERM the server's session, SIGKILL what lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@contextlib.contextmanager
def serving(model: str, log: Path, workers: int = 1, pythonpath: str = "",
            env: dict[str, str] | None = None) -> Iterator[Server]:
    server = start_server(model, free_port(), log, workers, pythonpath, env)
    try:
        yield server
    finally:
        stop_server(server)


def burst(server: Server, body: bytes, clients: int, guard: float | None = None,
          timeout: float = 900) -> dict[str, object]:
    """Send ``body`` from ``clients`` threads at once: statuses (0: no answer within
    ``timeout`` s), slowest answer, peak RSS."""
    with PeakRss(server.process.pid, guard=guard) as rss, \
            ThreadPoolExecutor(max_workers=clients) as pool:
        started = time.perf_counter()

        def send(_: int) -> tuple[int, float, bytes]:
            status, answer = post_raw(server.url, body, timeout)
            return status, time.perf_counter() - started, answer

        answers = list(pool.map(send, range(clients)))
    statuses = sorted({status for status, _, _ in answers})
    message = next((json.loads(answer).get("message", "") for status, _, answer in answers
                    if status >= 400 and answer.startswith(b"{")), "")
    return {"clients": clients, "statuses": statuses,
            "seconds": round(max(seconds for _, seconds, _ in answers), 3),
            "peak_rss_mb": round(rss.peak / 1e6), "guard_tripped": rss.tripped,
            "message": message}


def same_answer(server: Server, body: bytes, reference: dict) -> bool:
    status, answer = post_raw(server.url, body)
    return status == 200 and json.loads(answer)["predictions"] == reference


def latencies(server: Server, valid: Inputs, steps: list[int | None], repeats: int
              ) -> list[dict[str, object]]:
    """Sequential valid requests at each ``refine_steps`` (None: the request without it):
    client and server seconds (p50; the server's as its answer reports them)."""
    rows = []
    for count in steps:
        client, reported = [], []
        inputs = dict(valid) if count is None else {**valid, "refine_steps": count}
        body = json.dumps({"inputs": inputs}).encode()
        cpu = psutil.Process(server.process.pid)
        cpu_before = _tree_cpu_s(cpu)
        for _ in range(repeats):
            started = time.perf_counter()
            status, answer = post_raw(server.url, body)
            client.append(time.perf_counter() - started)
            if status == 200 and count is not None:
                reported.append(json.loads(answer)["predictions"]["time_s"][0])
        rows.append({"refine_steps": "default" if count is None else count, "status": status,
                     "client_p50_ms": round(1000 * statistics.median(client), 1),
                     "server_p50_ms": round(1000 * statistics.median(reported), 1)
                     if reported else None,
                     "server_cpu_ms_per_request": round(
                         1000 * (_tree_cpu_s(cpu) - cpu_before) / repeats, 1)})
    return rows


def _tree_cpu_s(process: psutil.Process) -> float:
    """CPU seconds (user + system) used so far by a process and its descendants."""
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = each.cpu_times()
            total += times.user + times.system
    return total


def workers_of(pid: int) -> list[psutil.Process]:
    """Every descendant of ``pid`` (its workers; for mlflow models serve also uvicorn)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_and_restart(model: str, log: Path, valid_body: bytes, pythonpath: str,
                     victim: str = "parent", env: dict[str, str] | None = None
                     ) -> dict[str, object]:
    """Serve with 2 workers, SIGKILL the supervisor (``victim``: "parent", the process started;
    "uvicorn", its uvicorn child when it has one), then restart on the same port and ask."""
    port = free_port()
    server = start_server(model, port, log, 2, pythonpath, env)
    children = workers_of(server.process.pid)
    target = server.process.pid
    if victim == "uvicorn":
        target = next(child.pid for child in children if "uvicorn" in " ".join(child.cmdline()))
    os.kill(target, signal.SIGKILL)
    killed = time.monotonic()
    survivors = []
    while time.monotonic() - killed < 20:
        survivors = [child for child in children if child.is_running() and
                     child.status() != psutil.STATUS_ZOMBIE and child.pid != target]
        if not survivors:
            break
        time.sleep(0.05)
    gone_s = time.monotonic() - killed
    result = {"victim": victim, "orphans_after_20s": len(survivors),
              "orphans_gone_s": None if survivors else round(gone_s, 2),
              "orphan_answers_ping": bool(survivors) and pinging(server.url)}
    restart = time.monotonic()
    try:
        restarted = start_server(model, port, log, 2, pythonpath, env)
    except RuntimeError as exc:
        result.update(restart="failed", restart_error=str(exc)[-300:])
    else:
        status, _ = post_raw(restarted.url, valid_body)
        time.sleep(3)  # an orphan may have answered the ping for a restart that failed to bind
        exited = restarted.process.poll()
        result.update(restart="ok" if exited is None else f"failed: exited with {exited}",
                      status_after_restart=status,
                      restart_to_answer_s=round(time.monotonic() - restart, 1))
        stop_server(restarted)
    for child in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    return result


def run(args: argparse.Namespace) -> dict[str, object]:
    valid = {"fixed": [b64(Path(args.fixed).read_bytes())],
             "moving": [b64(Path(args.moving).read_bytes())],
             "moving_label": [b64(Path(args.moving_label).read_bytes())]}
    valid_body = json.dumps({"inputs": valid}).encode()
    log = Path(args.log)
    env = dict(item.split("=", 1) for item in args.env)
    results: dict[str, object] = {"attacks": [], "regflow": args.regflow, "env": env}
    built = attacks(valid)
    names = [name for name in built if not args.only or any(key in name for key in args.only)]
    server = start_server(args.model, free_port(), log, 1, args.regflow, env)
    try:
        status, answer = post_raw(server.url, valid_body)
        reference = json.loads(answer)["predictions"] if status == 200 else None
        with PeakRss(server.process.pid) as idle:
            time.sleep(1)
        results["idle_rss_mb"] = round(idle.peak / 1e6)
        for name in names:
            body = json.dumps({"inputs": built[name]()}).encode()
            row: dict[str, object] = {"attack": name, "body_mb": round(len(body) / 1e6, 2)}
            for clients in (1, args.clients):
                outcome = burst(server, body, clients, args.guard_gb * 1e9, args.timeout)
                if outcome["guard_tripped"] or 0 in outcome["statuses"] or \
                        server.process.poll() is not None:  # killed, or still busy: a fresh one
                    stop_server(server)
                    server = start_server(args.model, free_port(), log, 1, args.regflow, env)
                outcome["valid_after"] = same_answer(server, valid_body, reference)
                row[f"x{clients}"] = outcome
            print(json.dumps(row), flush=True)
            results["attacks"].append(row)
        steps = [None if step == "default" else int(step) for step in args.steps]
        timed = {key: value for key, value in valid.items()
                 if key != "moving_label" or args.latency_label}
        results["latency_inputs"] = "valid pair" if args.latency_label else \
            "valid pair without its label"
        results["latency"] = latencies(server, timed, steps, args.repeats)
        print(json.dumps(results["latency"]), flush=True)
        with PeakRss(server.process.pid) as idle:
            time.sleep(1)
        results["idle_rss_mb_after"] = round(idle.peak / 1e6)
    finally:
        stop_server(server)
    results["restart"] = [kill_and_restart(args.model, log, valid_body, args.regflow, victim,
                                           env) for victim in args.victims]
    print(json.dumps(results["restart"]), flush=True)
    return results


def table(results: dict[str, object]) -> str:
    lines = ["| attack | body MB | 1 request | N at once | valid answer after |",
             "|---|---|---|---|---|"]
    for row in results["attacks"]:
        one, many = row["x1"], row[next(key for key in row if key.startswith("x") and
                                        key != "x1")]
        after = "yes" if one["valid_after"] and many["valid_after"] else "no"
        lines.append(f"| {row['attack']} | {row['body_mb']} | {_outcome_cell(one)} | "
                     f"{_outcome_cell(many)} | {after} |")
    return "\n".join(lines)


def _outcome_cell(outcome: dict) -> str:
    statuses = "/".join("none" if status == 0 else str(status) for status in outcome["statuses"])
    killed = ", guard: killed" if outcome["guard_tripped"] else ""
    return f"{statuses} in {outcome['seconds']:g} s, peak {outcome['peak_rss_mb']} MB{killed}"


RECORD_COLUMNS = ("served", "request", "body_mb", "once", "at_once", "valid_answer_after")


def record_rows(results: dict[str, object], served: str) -> list[dict[str, object]]:
    """The run as rows of a results file (:mod:`benchmarks.records`), one per request kind,
    each keyed by ``served`` (which code answered) and the request: the attacks (once and
    ``--clients`` at once), the latency at each ``refine_steps``, the supervisor's SIGKILL and
    restart, and the idle memory before and after."""
    def row(request: str, once: str, at_once: str = "", body_mb: object = "",
            valid_after: str = "") -> dict[str, object]:
        return dict(zip(RECORD_COLUMNS, (served, request, body_mb, once, at_once, valid_after),
                        strict=True))

    rows = [row("(idle, before and after the attacks)",
                f"RSS {results['idle_rss_mb']} MB, then {results['idle_rss_mb_after']} MB")]
    for attack in results["attacks"]:
        many = next(key for key in attack if key.startswith("x") and key != "x1")
        valid = attack["x1"]["valid_after"] and attack[many]["valid_after"]
        rows.append(row(attack["attack"], _outcome_cell(attack["x1"]),
                        f"{many[1:]}: {_outcome_cell(attack[many])}", attack["body_mb"],
                        "yes" if valid else "no"))
    inputs = results.get("latency_inputs", "valid pair")
    for timing in results["latency"]:
        server = timing["server_p50_ms"]
        rows.append(row(f"{inputs}, refine_steps {timing['refine_steps']}, in a row",
                        f"{timing['status']}, p50 {timing['client_p50_ms']:g} ms at the client"
                        + (f", {server:g} ms on the server" if server is not None else "")
                        + f", {timing['server_cpu_ms_per_request']:g} ms CPU"))
    for restart in results["restart"]:
        orphans = (f"workers gone in {restart['orphans_gone_s']:g} s"
                   if restart["orphans_gone_s"] is not None else
                   f"{restart['orphans_after_20s']} workers left after 20 s"
                   + (", answering /ping" if restart["orphan_answers_ping"] else ""))
        after = (f"restart {restart['restart']}, HTTP {restart['status_after_restart']} "
                 f"{restart['restart_to_answer_s']:g} s after it"
                 if "status_after_restart" in restart else f"restart {restart['restart']}")
        rows.append(row(f"SIGKILL of the {restart['victim']} (2 workers), restart on the port",
                        f"{orphans}; {after}"))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or a model folder")
    parser.add_argument("--fixed", required=True, help="a valid fixed image (.nii.gz)")
    parser.add_argument("--moving", required=True, help="a valid moving image (.nii.gz)")
    parser.add_argument("--moving-label", required=True, help="its label (.nii.gz)")
    parser.add_argument("--regflow", default=str(Path(__file__).resolve().parents[1]),
                        help="PYTHONPATH of the served regflow (default: this checkout)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds a client waits for an answer (then: no answer)")
    parser.add_argument("--guard-gb", type=float, default=8.0,
                        help="kill the server when its tree's RSS passes this")
    parser.add_argument("--steps", nargs="*", default=["default", "0", "25", "50", "100"],
                        help="refine_steps to time; 'default': requests without the field")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--latency-label", action=argparse.BooleanOptionalAction, default=True,
                        help="time the valid pair with its label (--no-latency-label: images only)")
    parser.add_argument("--victims", nargs="*", default=["parent"])
    parser.add_argument("--only", nargs="*", help="attacks whose name holds one of these")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="variables of the server (e.g. REGFLOW_QUEUE_TIMEOUT=600)")
    parser.add_argument("--log", default="serving_attacks.log")
    parser.add_argument("--machine", default=f"{os.cpu_count()} cores",
                        help="the machine note of --record's rows (e.g. 'idle')")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--record", metavar="FILE",
                        help="put the rows in this results file (benchmarks/results/"
                             "serving_attacks.json), replacing the rows of the same --label")
    parser.add_argument("--label", default="this checkout",
                        help="names the served code in --record's rows (e.g. 'before')")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.record:
        served = f"{args.label} ({records.git_commit(Path(args.regflow))})"
        machine = records.provenance(records.git_commit(), args.machine)
        records.upsert(args.record, [{**row, **machine} for row in record_rows(results, served)],
                       key_fields=("served", "request"), columns=RECORD_COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
