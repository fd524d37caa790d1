"""The shape of a Slurm job (nodes, tasks, GPUs, CPUs, time) and its checks: against itself, against the
fit config it runs, and against the cluster's partitions (`sinfo`), all before anything is queued."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from ftlab.errors import ConfigError, did_you_mean

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def time_seconds(value: str) -> int:
    """Seconds in a Slurm --time value; ConfigError when it is not one."""
    m = _TIME.match(value.strip())
    if not m:
        raise ConfigError(f"--time {value!r} is not a Slurm time; use e.g. 12:00:00 (H:M:S), 1-00:00:00 "
                          "(days-H:M:S) or 90 (minutes)")
    d, dh, dm, ds, a, b, c = m.groups()
    if d is not None:
        return ((int(d) * 24 + int(dh)) * 60 + int(dm or 0)) * 60 + int(ds or 0)
    parts = [int(x) for x in (a, b, c) if x is not None]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


# USR1's lead by default: time to write the checkpoint, on a conservative shared file system, plus a margin
WRITE_BYTES_PER_S_PER_NODE = 0.5e9
LEAD_MARGIN_S = 60  # the step in progress, then the requeue
MIN_LEAD_S = 120


def checkpoint_lead(total_params: int, trainable_params: int, writers: int = 1) -> tuple[int, str]:
    """Seconds of USR1 lead to write a checkpoint of this model, and why (one line). `writers`: nodes that
    write it in parallel (a sharded checkpoint: every node; a single file: rank 0's node alone)."""
    from types import SimpleNamespace

    from ftlab.checkpoints import checkpoint_bytes

    size = checkpoint_bytes(SimpleNamespace(total_params=total_params, trainable_params=trainable_params))
    write = size / (WRITE_BYTES_PER_S_PER_NODE * writers)
    lead = max(MIN_LEAD_S, math.ceil(write + LEAD_MARGIN_S))
    why = (f"checkpoint ~{size / 1e9:.1f} GB (fp32 weights and AdamW moments of {trainable_params:,} trained "
           f"params; frozen ones are left out) written by {writers} node(s) at {WRITE_BYTES_PER_S_PER_NODE / 1e9:g} "
           f"GB/s each: {write:.0f} s + {LEAD_MARGIN_S} s margin, at least {MIN_LEAD_S} s")
    return lead, why


@dataclass
class SlurmJob:
    """What `ftlab slurm submit` asks Slurm for."""

    nodes: int = 1
    gpus_per_node: int = 1
    ntasks_per_node: int | None = None  # default: one per GPU, or 1 on CPU-only nodes
    cpus_per_task: int = 8
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    job_name: str | None = None
    container: str | None = None
    signal_lead: int | None = None  # seconds before the time limit at which USR1 asks for a checkpoint + requeue
    signal_lead_why: str | None = None  # how ftlab chose the lead (None: the user's --signal-lead)
    sbatch_args: list[str] = field(default_factory=list)

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or max(self.gpus_per_node, 1)

    def check(self) -> None:
        """The shape on its own."""
        if self.nodes < 1:
            raise ConfigError(f"--nodes {self.nodes}: give at least 1 node")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node {self.gpus_per_node}: give 0 (CPU only) or more")
        if self.ntasks_per_node is not None and self.ntasks_per_node < 1:
            raise ConfigError(f"--ntasks-per-node {self.ntasks_per_node}: give at least 1")
        if self.gpus_per_node and self.ntasks_per_node and self.ntasks_per_node != self.gpus_per_node:
            raise ConfigError(f"--ntasks-per-node {self.ntasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                              "Lightning runs one task per GPU; drop --ntasks-per-node or make them equal")
        if self.cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task {self.cpus_per_task}: give at least 1")
        seconds = time_seconds(self.time)
        if seconds <= 0:
            raise ConfigError(f"--time {self.time!r}: give a positive time limit")
        if self.signal_lead is not None:
            self.check_signal_lead()
        if self.container and self.container.endswith(".sif") and not os.path.isfile(self.container):
            raise ConfigError(f"--container {self.container!r}: no such Apptainer image; give an existing .sif file "
                              "or an image name for pyxis")

    def check_signal_lead(self) -> None:
        seconds = time_seconds(self.time)
        if not 0 < self.signal_lead < seconds:
            if self.signal_lead_why is None:
                raise ConfigError(f"--signal-lead {self.signal_lead}: the checkpoint signal must come after the start "
                                  f"and before the time limit ({seconds} s); give 0 < seconds < {seconds}")
            raise ConfigError(f"--time {self.time}: the checkpoint needs a lead of {self.signal_lead} s before the "
                              f"time limit ({self.signal_lead_why}); give a longer --time or set --signal-lead")

    def check_trainer(self, trainer: dict) -> None:
        """The shape against the fit config's trainer section (Slurm's allocation becomes the trainer's)."""
        num_nodes = trainer.get("num_nodes") or 1
        if num_nodes not in (1, self.nodes):
            raise ConfigError(f"trainer.num_nodes={num_nodes} in the config but --nodes {self.nodes}: make them equal, "
                              "or drop trainer.num_nodes (the job sets it from its allocation)")
        devices = trainer.get("devices", "auto")
        if devices is None or str(devices).lower() in ("null", "none", ""):
            devices = "auto"  # `--trainer.devices null`: left to the job, as `auto`
        if isinstance(devices, (list, tuple)) or isinstance(devices, str) and "," in devices:
            raise ConfigError(f"trainer.devices={devices!r} lists devices; under Slurm give their number "
                              f"(--gpus-per-node), or drop trainer.devices")
        if str(devices) not in ("auto", "-1") and not str(devices).isdigit():
            raise ConfigError(f"trainer.devices={devices!r} is not a number of devices; give one, or auto")
        if str(devices) not in ("auto", "-1") and int(devices) != self.tasks_per_node:
            raise ConfigError(f"trainer.devices={devices} in the config but the job runs {self.tasks_per_node} task(s) "
                              f"per node: pass --gpus-per-node {devices} (or --ntasks-per-node {devices} on CPU), "
                              "or set trainer.devices to auto (--trainer.devices auto)")
        accelerator = str(trainer.get("accelerator", "auto"))
        if accelerator in ("gpu", "cuda") and self.gpus_per_node == 0:
            raise ConfigError(f"trainer.accelerator={accelerator} but --gpus-per-node 0; ask for GPUs "
                              "(--gpus-per-node N) or set trainer.accelerator cpu")
        if accelerator == "cpu" and self.gpus_per_node > 0:
            raise ConfigError(f"trainer.accelerator=cpu but --gpus-per-node {self.gpus_per_node} would hold GPUs "
                              "unused; pass --gpus-per-node 0 or set trainer.accelerator auto")

    def check_cluster(self) -> str | None:
        """The shape against the partition (`sinfo`). Returns why it was not checked, or None."""
        if shutil.which("sinfo") is None:
            return "sinfo not found: the shape was not checked against the cluster"
        # %P: partition name, with "*" on the default one
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G|%a"], capture_output=True, text=True)
        if out.returncode != 0:
            return f"sinfo failed ({out.stderr.strip()}): the shape was not checked against the cluster"
        partitions: dict[str, dict] = {}
        default = None
        for line in out.stdout.splitlines():
            name, nodes, cpus, gres, avail = line.split("|")
            if name.endswith("*"):
                name = default = name[:-1]
            p = partitions.setdefault(name, {"nodes": 0, "cpus": 0, "gpus": 0, "up": False})
            p["nodes"] += int(nodes)
            p["cpus"] = max(p["cpus"], int(cpus.rstrip("+")))
            m = re.search(r"gpu(?::[^:(,]+)?:(\d+)", gres)
            p["gpus"] = max(p["gpus"], int(m.group(1)) if m else 0)
            p["up"] |= avail == "up"
        name = self.partition or default
        if name is None:
            return None
        if name not in partitions:
            raise ConfigError(f"--partition {name!r} is not a partition of this cluster; "
                              f"{did_you_mean(name, sorted(partitions))}")
        p = partitions[name]
        if self.nodes > p["nodes"]:
            raise ConfigError(f"--nodes {self.nodes}: partition {name!r} has {p['nodes']} node(s)")
        if self.gpus_per_node > p["gpus"]:
            raise ConfigError(f"--gpus-per-node {self.gpus_per_node}: the nodes of partition {name!r} have "
                              f"{p['gpus']} GPU(s)")
        need = self.tasks_per_node * self.cpus_per_task
        if need > p["cpus"]:
            raise ConfigError(f"{self.tasks_per_node} task(s) x --cpus-per-task {self.cpus_per_task} = {need} CPUs per "
                              f"node, but the nodes of partition {name!r} have {p['cpus']}; lower --cpus-per-task")
        return None

