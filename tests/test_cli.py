"""The command line's error contract: exit code 2, one line on stderr, no traceback, nothing
half-written and no temporary file left behind.

Permission denied and a full disk are real, also as root (where ``chmod`` denies nothing):
sysfs refuses to create files even for root (EACCES), and a full disk is a tiny tmpfs mounted
in a private user + mount namespace (``unshare``), which vanishes with the command.
"""

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from regflow.cli import cli
from regflow.data.io import write_nifti
from regflow.serving.client import encode_file
from tests.test_client import StubServer, free_port

FORBIDDEN = "/sys/regflow-test-output"  # sysfs: EACCES/EPERM for every user, root included
TMPFS_SCRIPT = """
mount -t tmpfs -o size=64k tmpfs "$1" || exit 97
if [ "$2" = full ]; then head -c 1M /dev/zero > "$1/filler" 2>/dev/null; fi
disk=$1; shift 2
"$@"; status=$?
find "$disk" -mindepth 1
exit $status
"""


@cache
def can_mount_tmpfs() -> bool:
    """Whether ``unshare`` may mount a tmpfs here (root, or unprivileged user namespaces)."""
    try:
        return subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                               "mount -t tmpfs tmpfs /mnt"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A working folder with an image, a zero DDF of its grid, and things in an output's way:
    a plain file ``afile``, a FIFO ``fifo.nii.gz`` and a folder ``folder.nii.gz``.

    The image is 32^3 random noise: its .nii.gz (about 120 kB) does not fit the 64 kB disk.
    """
    monkeypatch.chdir(tmp_path)
    image = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    write_nifti(tmp_path / "image.nii.gz", image, np.eye(4))
    np.save(tmp_path / "ddf.npy", np.zeros((3, 32, 32, 32), np.float32))
    (tmp_path / "afile").write_text("in the way\n")
    os.mkfifo(tmp_path / "fifo.nii.gz")
    (tmp_path / "folder.nii.gz").mkdir()
    return tmp_path


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if not path.is_dir()}


PAIR = ["--fixed", "image.nii.gz", "--moving", "image.nii.gz"]
WARP = ["warp", "--image", "image.nii.gz", "--ddf", "ddf.npy", "--out"]
PREDICT = ["predict", "--model", "absent.pt", *PAIR, "--out"]
REQUEST = ["request", "http://127.0.0.1:9", *PAIR, "--timeout", "5", "--out"]

# (id, arguments, text the one line must contain, tmpfs: None | "full" | "space for the probe")
ROWS = [
    ("warp-permission-denied", [*WARP, f"{FORBIDDEN}.nii.gz"],
     f"{FORBIDDEN}.nii.gz: /sys: cannot write into the folder", None),
    ("warp-parent-is-a-file", [*WARP, "afile/warped.nii.gz"],
     "afile/warped.nii.gz: afile: exists and is not a folder", None),
    ("warp-ancestor-is-a-file", [*WARP, "afile/sub/warped.nii.gz"],
     "afile: exists and is not a folder", None),
    ("warp-no-nifti-suffix", [*WARP, "warped"], "warped: the file name must end in .nii.gz",
     None),
    ("warp-device", [*WARP, "/dev/full"], "/dev/full: the file name must end", None),
    ("warp-fifo", [*WARP, "fifo.nii.gz"], "fifo.nii.gz: exists and is not a regular file", None),
    ("warp-out-is-a-folder", [*WARP, "folder.nii.gz"], "'--out'", None),
    ("warp-disk-full", [*WARP, "disk/warped.nii.gz"], "disk/warped.nii.gz: disk: cannot write "
     "into the folder (No space left on device)", "full"),
    ("warp-disk-full-while-writing", [*WARP, "disk/warped.nii.gz"],
     "No space left on device (while writing disk/warped.nii.gz)", "probe"),
    ("predict-permission-denied", [*PREDICT, FORBIDDEN], FORBIDDEN, None),
    ("predict-parent-is-a-file", [*PREDICT, "afile/out"], "afile: exists and is not a folder",
     None),
    ("predict-out-is-a-file", [*PREDICT, "afile"], "'--out'", None),
    ("predict-disk-full", [*PREDICT, "disk/out"], "No space left on device", "full"),
    ("request-permission-denied", [*REQUEST, FORBIDDEN], FORBIDDEN, None),
    ("request-parent-is-a-file", [*REQUEST, "afile/out"], "afile: exists and is not a folder",
     None),
    ("request-disk-full", [*REQUEST, "disk/out"], "No space left on device", "full"),
    ("request-not-a-url", ["request", "notaurl", *PAIR, "--out", "out"], "notaurl: not a URL",
     None),
    ("request-unsupported-scheme", ["request", "ftp://host/x", *PAIR, "--out", "out"],
     "unsupported scheme 'ftp'", None),
    ("request-no-host", ["request", "http://", *PAIR, "--out", "out"], "http://: no host", None),
    ("request-bad-port", ["request", "http://host:abc", *PAIR, "--out", "out"],
     "http://***: not a valid URL", None),  # unreadable URLs are masked whole
    ("request-bad-ipv6", ["request", "http://[::1", *PAIR, "--out", "out"], "not a valid URL",
     None),
    ("request-unreachable", ["request", f"http://127.0.0.1:{free_port()}", *PAIR, "--out",
                             "out"], "no answer", None),
    ("request-password-masked", ["request", "ftp://me:s3cret@host/x", *PAIR, "--out", "out"],
     "ftp://me:***@host/x: unsupported scheme", None),
    ("override-malformed-yaml", ["evaluate", "-S", "train.steps={"],
     "override 'train.steps={': not valid YAML", None),
    ("override-unclosed-list", ["evaluate", "-S", "train.steps=[1"], "not valid YAML", None),
    ("override-yaml-tag", ["evaluate", "-S", "train.name=!!python/object:os.system"],
     "not valid YAML", None),
    ("override-no-equals", ["evaluate", "-S", "train.steps"], "expected key.path=value", None),
    ("override-empty-key", ["evaluate", "-S", "=3"], "expected key.path=value", None),
    ("override-empty-segment", ["evaluate", "-S", "train..steps=3"], "expected key.path=value",
     None),
    ("override-bad-value", ["evaluate", "-S", "train.steps=-1"], "train.steps", None),
    ("params-empty", ["evaluate", "-c", "empty/params.yaml"],
     "empty/params.yaml: the file is empty", None),
    ("params-only-comments", ["evaluate", "-c", "comments.yaml"],
     "comments.yaml: the file is empty", None),
    ("params-not-utf8", ["evaluate", "-c", "latin1.yaml"], "latin1.yaml: not UTF-8", None),
    ("evaluate-metrics-dir-is-a-file", ["evaluate"], "metrics: exists and is not a folder",
     None),
    ("oserror-escaping-a-command", ["fetch", "-S", "data.raw_dir=afile/raw"],
     "afile/raw: Not a directory", None),
]


def run_regflow(args: list[str], workdir: Path, tmpfs: str | None) -> tuple[int, str, set[str]]:
    """Run the CLI; returns (exit code, stderr, paths left on the small disk).

    Without ``tmpfs`` the real click CLI runs in process; with it, ``python -m regflow.cli`` runs
    in a namespace where ``disk/`` is a 64 kB tmpfs (``full`` to the last byte, or ``probe``:
    room for the write probe but not for the output).
    """
    if tmpfs is None:
        result = CliRunner().invoke(cli, args)
        assert isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, result.stderr, set()
    if not can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    (workdir / "disk").mkdir()
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", TMPFS_SCRIPT,
                             "sh", "disk", tmpfs, sys.executable, "-m", "regflow.cli", *args],
                            cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode != 97, result.stderr
    return result.returncode, result.stderr, set(result.stdout.split())


@pytest.mark.parametrize(("args", "expected", "tmpfs"), [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_error_is_exit_2_and_one_line(inputs, args, expected, tmpfs):
    (inputs / "empty").mkdir()
    (inputs / "empty" / "params.yaml").write_text("")
    (inputs / "comments.yaml").write_text("# nothing but a comment\n")
    (inputs / "latin1.yaml").write_bytes("seed: 1  # sé\n".encode("latin-1"))
    (inputs / "params.yaml").write_text("seed: 1\n")
    (inputs / "metrics").write_text("a file where the metrics folder belongs\n")
    before = files_under(inputs)
    code, stderr, on_disk = run_regflow(args, inputs, tmpfs)
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("Error: "), stderr
    assert expected in stderr
    assert "Traceback" not in stderr and "s3cret" not in stderr
    assert files_under(inputs) == before
    assert on_disk <= {"disk/filler"}


def test_predict_checks_out_before_loading_a_model(tmp_path):
    """--out is refused before the model (absent here) is looked at or torch is imported."""
    code = ("import sys\nfrom regflow.cli import main\n"
            "try:\n    main()\nfinally:\n    print(sorted({'torch', 'regflow.predict'} & "
            "set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code, "predict", "--model", "absent.pt",
                             "--fixed", "absent.nii.gz", "--moving", "absent.nii.gz",
                             "--out", f"{FORBIDDEN}/out"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"Error: {FORBIDDEN}") and result.stderr.count("\n") == 1
    assert "absent" not in result.stderr
    assert result.stdout.strip() == "[]"


def test_warp_writes_when_the_output_is_fine(inputs):
    result = CliRunner().invoke(cli, [*WARP, "new/warped.nii.gz"])
    assert result.exit_code == 0, result.output
    assert (inputs / "new" / "warped.nii.gz").is_file()
    assert [path.name for path in (inputs / "new").iterdir()] == ["warped.nii.gz"]


@pytest.mark.parametrize(("status", "answer", "expected", "tmpfs"), [
    (500, {"error_code": "INTERNAL_ERROR"}, "/invocations: HTTP 500: ", None),
    (200, [1, 2], "/invocations: the answer is not a JSON object", None),
    (200, "warped", "No space left on device (while writing disk/out)", "probe"),
], ids=["http-error", "answer-not-an-object", "disk-full-while-writing-the-answer"])
def test_request_answer_failures_are_exit_2_and_one_line(inputs, status, answer, expected,
                                                         tmpfs):
    if answer == "warped":  # the 32^3 noise image back: about 120 kB for the 64 kB disk
        answer = {"predictions": {"warped": [encode_file(inputs / "image.nii.gz")]}}
    before = files_under(inputs)
    with StubServer(lambda body: (status, answer)) as server:
        code, stderr, on_disk = run_regflow(["request", server.url, *PAIR, "--out", "disk/out"],
                                            inputs, tmpfs)
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1 and expected in stderr, stderr
    assert files_under(inputs) == before
    assert on_disk <= {"disk/out"}  # an empty folder: no temporary, no partial file
