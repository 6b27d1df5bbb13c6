"""docs/ARCHITECTURE.md names every file of the package once, and nothing else."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_document_matches_the_package_files():
    listed = subprocess.run(["git", "ls-files", "regflow"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    document = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    documented = re.findall(r"^\| `(regflow/[^`]+)` \|", document, flags=re.MULTILINE)
    assert len(documented) == len(set(documented)), "a file is documented twice"
    assert sorted(documented) == sorted(listed)
