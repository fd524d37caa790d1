"""Rendering a batch script from a template in `slurm/`: its `#SBATCH` lines take the job's shape, and its
settings block the `ftlab fit` arguments, every value shell-quoted."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from ftlab.errors import ConfigError
from ftlab.slurm.job import MIN_LEAD_S, SlurmJob

# The templates are the repository's slurm/ folder: the project's own (in a clone or an editable install,
# next to the package), else one in the working directory.
TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
DEFAULT_TEMPLATE = TEMPLATES / "fit.sbatch" if (TEMPLATES / "fit.sbatch").exists() else Path("slurm/fit.sbatch")
_BEGIN, _END = "# >>> ftlab settings", "# <<< ftlab settings"
_SBATCH = re.compile(r"^#SBATCH\s+--([\w-]+)(?:[= ](.*))?$")
_PLAIN = re.compile(r"^[\w@%./:+=,-]+$")


def _directive_value(key: str, value: str) -> str:
    """#SBATCH lines are read by sbatch, not by a shell: no expansion happens there, but a newline would
    start a new directive and whitespace ends the value unless double-quoted."""
    value = str(value)
    if _PLAIN.match(value):
        return value
    if "\n" in value or '"' in value:
        raise ConfigError(f"--{key} {value!r}: newlines and double quotes cannot go into an #SBATCH line")
    return f'"{value}"'


def slurm_path(path: str) -> str:
    """A path as Slurm's --output reads it: its own `%` doubled (Slurm expands %j, %x, %u...: a run directory
    named `lr%x` would send the log elsewhere than ftlab says)."""
    return path.replace("%", "%%")


def job_name(job: SlurmJob, run_dir: str) -> str:
    """The job's name: given, or the run directory's, reduced to characters every tool takes."""
    name = job.job_name or Path(run_dir).name or "ftlab"
    return re.sub(r"[^\w.-]", "_", name)[:64]


def directives(job: SlurmJob, run_dir: str) -> dict[str, str | bool | None]:
    """#SBATCH option -> value (True: a flag; None: leave out)."""
    return {
        "job-name": job_name(job, run_dir),
        "nodes": str(job.nodes),
        "ntasks-per-node": str(job.tasks_per_node),
        "gpus-per-node": str(job.gpus_per_node) if job.gpus_per_node else None,
        "cpus-per-task": str(job.cpus_per_task),
        "time": job.time,
        "signal": f"USR1@{job.signal_lead or MIN_LEAD_S}",
        "requeue": True,
        "open-mode": "append",
        "output": f"{slurm_path(run_dir)}/slurm-%j.out",
        "partition": job.partition,
        "account": job.account,
        "qos": job.qos,
        "mem": job.mem,
    }


def render(template: str, job: SlurmJob, *, run_dir: str, workdir: str, fit_args: list[str], python: str) -> str:
    """The batch script: the template with the job's #SBATCH values and the settings block filled in."""
    if _BEGIN not in template or _END not in template:
        raise ConfigError(f"the template has no '{_BEGIN}' ... '{_END}' block for ftlab to fill in")
    wanted = directives(job, run_dir)
    out: list[str] = []
    seen: set[str] = set()
    lines = template.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _SBATCH.match(line)
        if m and m.group(1) in wanted:
            key = m.group(1)
            seen.add(key)
            value = wanted[key]
            if value is True:
                out.append(f"#SBATCH --{key}")
            elif value is not None:
                out.append(f"#SBATCH --{key}={_directive_value(key, value)}")
        elif line.startswith(_BEGIN):
            out.append(line)
            for key, value in wanted.items():  # options the template does not name go after its last one
                if key not in seen and value is not None:
                    out.insert(_last_directive(out) + 1, f"#SBATCH --{key}" if value is True
                               else f"#SBATCH --{key}={_directive_value(key, value)}")
                    seen.add(key)
            for arg in job.sbatch_args:
                out.insert(_last_directive(out) + 1, f"#SBATCH {_directive_value('sbatch-arg', arg)}")
            out.append(f"# USR1 {job.signal_lead or MIN_LEAD_S} s before the time limit: "
                       f"{' '.join((job.signal_lead_why or 'given with --signal-lead').split())}")
            out.append(f"FTLAB_ARGS=({' '.join(shlex.quote(a) for a in fit_args)})")
            out.append(f"PYTHON={shlex.quote(python)}")
            out.append(f"CONTAINER={shlex.quote(job.container or '')}")
            out.append(f"WORKDIR={shlex.quote(workdir)}")
            while i < len(lines) and not lines[i].startswith(_END):
                i += 1
            out.append(_END)
        else:
            out.append(line)
        i += 1
    return "\n".join(out) + "\n"


def _last_directive(lines: list[str]) -> int:
    return max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
