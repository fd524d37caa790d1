"""`ftlab compare --slurm`: every run of a stage (the comparison's runs, or one rung of `--tune lr`) as ONE
Slurm job array, and after it (`--dependency=afterany`) the job that goes on: the report
(`ftlab compare ... --report-only`) after the comparison's runs, or `ftlab compare ... --slurm` again after a
rung, which submits the next stage. The job shape is `ftlab slurm submit`'s (SlurmJob, its checks, the
template rendering, every value shell-quoted); finished runs are left out of the array. Secrets stay in the
environment (sbatch exports it to the jobs): nothing but run directories and the command line go into the
scripts."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ftlab.compare.runner import ARGS_FILE, Run, prepare
from ftlab.errors import ConfigError
from ftlab.slurm.cli import add_shape_arguments
from ftlab.slurm.job import MIN_LEAD_S, SlurmJob
from ftlab.slurm.script import TEMPLATES, _directive_value, render, slurm_path

ARRAY_TEMPLATE = TEMPLATES / "compare-array.sbatch" if (TEMPLATES / "compare-array.sbatch").exists() \
    else Path("slurm/compare-array.sbatch")
CONTINUE = "--slurm-continue"  # hidden: the job after a tuning rung (its runs that did not finish failed)


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster fan-out", "--slurm: each stage's runs as one Slurm job array (shape options as "
                                                "for `ftlab slurm submit`, per run), the report as a job after it")
    g.add_argument("--slurm", action="store_true", help="submit the runs to Slurm instead of running them here")
    g.add_argument("--max-parallel", type=int, default=8,
                   help="array tasks running at once (--array=0-N%%K); default 8")
    add_shape_arguments(g)
    g.add_argument("--signal-lead", type=int, help=f"seconds before the time limit at which a run checkpoints and "
                                                   f"requeues itself (default {MIN_LEAD_S})")
    g.add_argument("--sbatch-arg", action="append", default=[], dest="sbatch_args",
                   help="any other sbatch option for the array, e.g. --sbatch-arg=--exclusive")
    g.add_argument("--dry-run", action="store_true", help="with --slurm: print the scripts, queue nothing")
    g.add_argument("--no-cluster-check", action="store_true", help="do not check the shape against sinfo")
    g.add_argument(CONTINUE, action="store_true", help=argparse.SUPPRESS)


def job_from(args: argparse.Namespace, name: str) -> SlurmJob:
    if args.max_parallel < 1:
        raise ConfigError(f"--max-parallel {args.max_parallel}: give at least 1")
    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node,
                   cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition, account=args.account,
                   qos=args.qos, mem=args.mem, job_name=f"compare-{name}", container=args.container,
                   signal_lead=args.signal_lead or MIN_LEAD_S, sbatch_args=list(args.sbatch_args))
    if args.signal_lead is None:
        job.signal_lead_why = "the minimum (compare does not size it per run; set --signal-lead for a large model)"
    job.check()
    return job


def check(job: SlurmJob, args: argparse.Namespace, trainers: list[dict]) -> None:
    """The shape against every variant's trainer settings and (unless told not to) the cluster."""
    for trainer in trainers:
        job.check_trainer(trainer)
    note = "the shape was not checked against a cluster (--no-cluster-check)" if args.no_cluster_check \
        else job.check_cluster()
    if note:
        print(f"ftlab: note: {note}", file=sys.stderr)


def _follow_up(job: SlurmJob, name: str, root: str, command: list[str], python: str) -> str:
    """A one-task job that runs `command` (an ftlab command line) in the submission's working directory."""
    d = {"job-name": f"compare-{name}-{'report' if '--report-only' in command else 'next'}", "nodes": "1",
         "ntasks": "1", "cpus-per-task": "1", "time": job.time, "output": f"{slurm_path(root)}/slurm/%x-%j.out",
         "partition": job.partition, "account": job.account, "qos": job.qos}
    lines = ["#!/bin/bash"] + [f"#SBATCH --{k}={_directive_value(k, v)}" for k, v in d.items() if v is not None]
    if job.container and job.container.endswith(".sif"):
        launch = ["apptainer", "exec", "--bind", os.getcwd(), job.container, "python"]
    elif job.container:
        launch = ["srun", f"--container-image={job.container}", f"--container-mounts={os.getcwd()}:{os.getcwd()}",
                  f"--container-workdir={os.getcwd()}", "python"]
    else:
        launch = [python]
    lines += ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", "export PYTHONUNBUFFERED=1",
              " ".join(shlex.quote(a) for a in launch + ["-m", "ftlab", "compare", *command])]
    return "\n".join(lines) + "\n"


def _sbatch(script: str, path: str, *options: str) -> str:
    with open(path, "w") as f:
        f.write(script)
    out = subprocess.run(["sbatch", "--parsable", *options, path], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"sbatch refused the job: {out.stderr.strip()} (script: {path})")
    return out.stdout.strip().split(";")[0]


def submit(job: SlurmJob, args: argparse.Namespace, argv: list[str], name: str, root: str, runs: list[Run],
           stage: str, final: bool) -> int:
    """The unfinished `runs` as one array, then the report (final) or the next stage's submission after it."""
    root = os.path.abspath(root)
    python = "python" if job.container else sys.executable
    argv = [a for a in argv if a not in (CONTINUE, "--dry-run")]
    then = argv + ["--report-only"] if final else argv + [CONTINUE]
    pending = [r for r in runs if not r.finished()]
    follow = _follow_up(job, name, root, then, python)
    if not args.dry_run:
        os.makedirs(os.path.join(root, "slurm"), exist_ok=True)
    what = "the report" if final else "the next stage's submission"
    if not pending:
        print(f"ftlab: {stage}: every run finished before; nothing to run")
        if args.dry_run:
            print(follow, end="")
            return 0
        jid = _sbatch(follow, os.path.join(root, "slurm", "report.sbatch" if final else "next.sbatch"))
        print(f"submitted Slurm job {jid}: {what}")
        return 0
    job.sbatch_args = [*job.sbatch_args, f"--array=0-{len(pending) - 1}%{args.max_parallel}"]
    dirs = [os.path.abspath(r.run_dir) for r in pending]
    array = render(ARRAY_TEMPLATE.read_text(), job, run_dir=os.path.join(root, "slurm"), workdir=os.getcwd(),
                   fit_args=dirs, python=python)
    if args.dry_run:
        print(array, end="")
        print(follow, end="")
        print(f"ftlab: dry run: {len(pending)} run(s) of {stage} as one array, then {what}; nothing was queued",
              file=sys.stderr)
        return 0
    for run in pending:
        fit_args = prepare(run)
        if any("\0" in a for a in fit_args):
            raise ConfigError(f"{run.run_dir}: an argument holds a NUL character")
        with open(os.path.join(run.run_dir, ARGS_FILE), "w") as f:
            f.write("".join(a + "\0" for a in fit_args))
    array_id = _sbatch(array, os.path.join(root, "slurm", f"{stage.replace(' ', '-')}.sbatch"))
    follow_id = _sbatch(follow, os.path.join(root, "slurm", "report.sbatch" if final else "next.sbatch"),
                        f"--dependency=afterany:{array_id}")
    print(f"submitted Slurm job array {array_id}: {len(pending)} run(s) of {stage} "
          f"({len(runs) - len(pending)} finished before, reused), at most {args.max_parallel} at once")
    for i, d in enumerate(dirs):
        print(f"  {array_id}_{i}: {d}")
    print(f"submitted Slurm job {follow_id}: {what}, after the array (afterany)")
    print(f"  report:  {os.path.join(root, 'report.md')} when it has run")
    print(f"  watch:   squeue -j {array_id},{follow_id}")
    return 0
