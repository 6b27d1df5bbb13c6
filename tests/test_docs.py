"""No tracked text file points outside the repository: what a clone holds is all a reader needs.

Checked in every tracked text file (Markdown, YAML, Python, TOML, shell, Dockerfile, Makefile, CI
files): no path into the folder beside the repository (``../shared``), no absolute path of one
machine (``/work/...``, home folders); and in Markdown, every relative link resolves to a file or
folder inside the repository, every ``#anchor`` to a heading of its page.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".md", ".yaml", ".yml", ".py", ".toml", ".txt", ".cfg", ".sh", ".json", ".lock",
                 ".sha256"}
TEXT_NAMES = {"Dockerfile", "Makefile", "run", ".gitignore", ".dvcignore", "config"}
OUTSIDE = {
    "the folder beside the repository": re.compile(r"\.\./shared\b|\"shared\" */ *\"data\""),
    "this machine's work folder": re.compile(r"(?<![\w.$}])/work/"),
    "a home folder": re.compile(r"(?<![\w.$}])(/home/\w+|/root/|/Users/\w+)"),
}
# The one file that may name its host's layout: the CI entry point runs on a machine that puts the
# data mirror beside the clone, and says so.
HOST_LAYOUT = {(".ci/run", "the folder beside the repository")}
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()  # names what it looks for
# Files that a command writes (not by hand); a link to one is valid before it first runs.
GENERATED = {"docs/results.md": "python -m benchmarks.results"}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def tracked_text_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    return [name for name in listed if (ROOT / name).is_file()
            and (Path(name).suffix in TEXT_SUFFIXES or Path(name).name in TEXT_NAMES)]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"```.*?```", "", markdown, flags=re.S),
                          flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def outside_pointers(name: str, text: str) -> list[str]:
    """Every pointer of ``text`` (the file ``name``) to outside the repository, as messages."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in OUTSIDE.items():
            if pattern.search(line) and (name, what) not in HOST_LAYOUT:
                problems.append(f"{name}:{number}: {what}: {line.strip()}")
    return problems


def broken_links(name: str, text: str) -> list[str]:
    """Every relative Markdown link of ``text`` (the page ``name``) that leads nowhere."""
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        page = (ROOT / name).parent / path_part if path_part else ROOT / name
        resolved = page.resolve()
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{name}: {target} leads outside the repository")
            continue
        relative = resolved.relative_to(ROOT).as_posix()
        if not resolved.exists():
            if relative not in GENERATED:
                problems.append(f"{name}: {target}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            problems.append(f"{name}: {target}: no heading with that anchor")
    return problems


def test_no_tracked_file_points_outside_the_repository():
    problems = []
    for name in tracked_text_files():
        text = (ROOT / name).read_text(errors="replace")
        if name != THIS_FILE:
            problems += outside_pointers(name, text)
        if name.endswith(".md"):
            problems += broken_links(name, text)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("line", [
    "see ../shared/DESIGN.md", "mirror = REPO_ROOT.parent / \"shared\" / \"data\"",
    "cd /work/main && make", "cp /home/alice/data .", "open /root/notes.txt",
])
def test_pointers_outside_are_found(line):
    assert outside_pointers("x.py", line)


@pytest.mark.parametrize("line", [
    "docker run -v $PWD:/project -w /project", "path: /data/prostate", "~/.pgpass",
    "shared/data is a folder name", "${HOME}/work/x", "artifacts at ./work/",
])
def test_ordinary_paths_are_not_pointers_outside(line):
    assert outside_pointers("x.py", line) == []


def test_links_are_checked_against_the_tree():
    page = "docs/ARCHITECTURE.md"
    assert broken_links(page, "[conventions](CONVENTIONS.md#mlflow) [up](../README.md)") == []
    assert broken_links(page, "[a](missing.md) [b](../../outside.md) [c](CONVENTIONS.md#nope)"
                        ) == [f"{page}: missing.md: no such file",
                              f"{page}: ../../outside.md leads outside the repository",
                              f"{page}: CONVENTIONS.md#nope: no heading with that anchor"]
    assert broken_links(page, "[results](results.md) [web](https://example.org/x.md)") == []


def test_anchors_follow_github():
    assert anchors("# Tracking (MLflow)\n## Serving contract\n```\n# not a heading\n```\n") == {
        "tracking-mlflow", "serving-contract"}
