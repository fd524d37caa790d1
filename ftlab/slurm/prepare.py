"""`ftlab slurm submit --prepare`: the data is tokenised before the GPU job starts, so that GPU nodes never
wait on it. `local`: here, before `sbatch`; `job`: as a CPU job that the training job depends on
(`--dependency=afterok`); `none`: by the job's own rank 0, as `fit` does; `auto` (default): nothing if the cache is
there, `local` for small local data, `job` otherwise."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from ftlab.errors import ConfigError
from ftlab.slurm.script import slurm_path

MODES = ("auto", "local", "job", "none")
LOCAL_MAX_BYTES = 200 * 1024**2  # larger data (or a hub dataset) is prepared by a CPU job by default


def add_prepare_arguments(p) -> None:
    p.add_argument("--prepare", choices=MODES, default="auto",
                   help="tokenise the data before the job: local (here, now), job (a CPU job the training job "
                        "depends on, afterok), none (the job's rank 0 does it, as fit does); auto: nothing when the "
                        f"cache is there, else local for local data files up to {LOCAL_MAX_BYTES // 1024**2} MB, "
                        "else job")
    p.add_argument("--prepare-cpus", type=int, help="cores of the preparation job (default: --cpus-per-task)")
    p.add_argument("--prepare-time", default="04:00:00", help="time limit of the preparation job")
    p.add_argument("--prepare-partition", help="partition of the preparation job (default: --partition)")


def data_bytes(dm) -> int | None:
    """Bytes of the data's local files; None for a hub dataset (size unknown before downloading it)."""
    entries = getattr(dm.source, "entries", None) or [dm.source]  # data.sources, or one data.source
    total = 0
    for entry in entries:
        inner = getattr(entry, "source", entry)
        if getattr(inner, "hub_id", None) or not getattr(inner, "files", None):
            return None
        total += sum(os.path.getsize(f) for files in inner.files.values() for f in files)
    return total


def choose(mode: str, dm, container: str | None = None) -> tuple[str, str]:
    """(local, job or none, why): what --prepare `mode` does for this data module. The preparation job runs
    on the host, not in `container` (the training job would wait on a job that fails: afterok)."""
    from ftlab.data.prepare import is_complete

    if mode == "job" and container:
        raise ConfigError(f"--prepare job with --container {container!r}: the preparation job does not run inside "
                          "the container yet; use --prepare local (here, before sbatch) or none (the job's ranks)")
    if is_complete(dm.cache_path):
        return "none", f"the tokenised data is in the cache already ({dm.cache_path})"
    if mode != "auto":
        return mode, f"--prepare {mode}"
    size = data_bytes(dm)
    if size is not None and size <= LOCAL_MAX_BYTES:
        return "local", f"--prepare auto: {size / 1024**2:.1f} MB of local data, tokenised here before sbatch"
    what = "a hub dataset" if size is None else f"{size / 1024**2:.0f} MB of data"
    if container:
        return "none", f"--prepare auto: {what}; with --container the job's ranks tokenise it (no preparation job)"
    return "job", f"--prepare auto: {what}, tokenised by a CPU job that the training job waits for"


def prepare_here(dm) -> None:
    from ftlab.data import prepare

    dm.prepare_data()
    dm.setup()
    info = prepare.summary(dm)
    rows = ", ".join(f"{split} {s['rows']:,} rows" for split, s in info["splits"].items())
    print(f"ftlab: data prepared here: {rows} in {info['cache']}", file=sys.stderr)


def job_command(args, job, run_dir: str, workdir: str, frozen_path: str, python: str) -> list[str]:
    """The sbatch command line of the preparation job: one task on one node, no GPU."""
    cmd = ["sbatch", "--parsable", f"--job-name={job.job_name or os.path.basename(run_dir)}-prepare", "--nodes=1",
           "--ntasks=1", f"--cpus-per-task={args.prepare_cpus or job.cpus_per_task}", f"--time={args.prepare_time}",
           f"--output={slurm_path(run_dir)}/prepare-%j.out", "--open-mode=append"]
    for flag, value in (("partition", args.prepare_partition or job.partition), ("account", job.account),
                        ("qos", job.qos), ("mem", job.mem)):
        if value:
            cmd.append(f"--{flag}={value}")
    run = f"cd {shlex.quote(workdir)} && exec {shlex.quote(python)} -m ftlab prepare --config {shlex.quote(frozen_path)}"
    return [*cmd, f"--wrap={run}"]


def submit_job(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused the preparation job: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
