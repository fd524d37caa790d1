"""`python -m ftlab slurm submit|render`: the same config a user tried locally, as a Slurm job of N nodes x G
GPUs, checked before anything is queued."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from ftlab.checkpoints import check_fresh_run_dir
from ftlab.errors import ConfigError
from ftlab.slurm import prepare as data_prep
from ftlab.slurm.job import MIN_LEAD_S, SlurmJob, checkpoint_lead
from ftlab.slurm.script import DEFAULT_TEMPLATE, render

FROZEN_CONFIG = "submitted-config.yaml"
SCRIPT = "job.sbatch"


class _ShowDefaults(argparse.HelpFormatter):
    """Each option's default in its help, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def add_shape_arguments(p) -> None:
    """A job's shape, as `ftlab slurm` and `ftlab compare --slurm` (per run of its array) both take it."""
    p.add_argument("--nodes", type=int, default=1, help="nodes (= trainer.num_nodes); default 1")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one task each; 0 for CPU-only")
    p.add_argument("--ntasks-per-node", type=int, help="tasks per node on CPU-only nodes (default 1)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (data loading, threads)")
    p.add_argument("--time", default="04:00:00", help="time limit, e.g. 12:00:00 or 1-00:00:00")
    p.add_argument("--partition", help="partition (default: the cluster's default)")
    p.add_argument("--account", help="account to charge")
    p.add_argument("--qos", help="quality of service")
    p.add_argument("--mem", help="memory per node, e.g. 200G (default: the partition's)")
    p.add_argument("--container", help="container: a .sif file (Apptainer) or an image name (pyxis/enroot)")


def parser(action: str | None = None) -> argparse.ArgumentParser:
    """`action` (submit or render) named: the usage line names it and it is not parsed again."""
    p = argparse.ArgumentParser(
        prog="python -m ftlab slurm" + (f" {action}" if action else ""), allow_abbrev=False,
        formatter_class=_ShowDefaults,
        description="Run `ftlab fit` as a Slurm job. Arguments not listed here go to `ftlab fit` "
                    "(e.g. --trainer.max_epochs 3).",
        epilog="submit checks the config, the job shape and the partition, freezes the config into the run "
               "directory, renders the template and calls `sbatch --parsable`. render writes the frozen config "
               "and prints the script, queueing nothing.")
    if action is None:
        p.add_argument("action", choices=["submit", "render"])
    p.add_argument("--config", action="append", required=True, help="fit config file (repeatable, as for fit)")
    add_shape_arguments(p)
    p.add_argument("--job-name", help="job name (default: the run directory's name)")
    p.add_argument("--signal-lead", type=int,
                   help="seconds before the time limit at which the job checkpoints and requeues itself. Default: "
                        "the time to write the checkpoint (fp32 weights + AdamW moments of the trainable ones, "
                        "counted on a weightless model) at 0.5 GB/s per node, plus 60 s, at least 120 s. Sharded "
                        "checkpoints (fsdp, deepspeed_stage_3) count every node writing in parallel; single files "
                        "(ddp, fsdp state_dict_type full) and ZeRO-1/2 (rank 0 writes the weights) one node")
    p.add_argument("--sbatch-arg", action="append", default=[], dest="sbatch_args",
                   help="any other sbatch option, as one #SBATCH line, e.g. --sbatch-arg=--exclusive")
    p.add_argument("--template", default=str(DEFAULT_TEMPLATE), help="batch script template")
    p.add_argument("--gpu-type", default="H100", type=str.upper,
                   help="GPU model of the nodes, for the memory estimate (default H100; see `ftlab estimate --help`)")
    p.add_argument("--no-estimate", action="store_true",
                   help="skip the memory estimate before submitting (the parameters are still counted for the "
                        "default --signal-lead)")
    data_prep.add_prepare_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="check and print the script; queue nothing")
    p.add_argument("--no-cluster-check", action="store_true",
                   help="do not check the shape against this machine's cluster (sinfo): render for another one")
    return p


def prepare(args: argparse.Namespace, fit_overrides: list[str]) -> tuple[SlurmJob, str, str, str]:
    """All checks, then (job, run dir, frozen config YAML, script text). Nothing is written here."""
    from ftlab.cli import check_fit_config

    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node,
                   cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                   account=args.account, qos=args.qos, mem=args.mem, job_name=args.job_name,
                   container=args.container, signal_lead=args.signal_lead, sbatch_args=args.sbatch_args)
    job.check()
    if not os.path.isfile(args.template):
        raise ConfigError(f"--template {args.template!r} does not exist; give a batch script like slurm/fit.sbatch")
    fit_args = [a for c in args.config for a in ("--config", c)] + fit_overrides
    trainer, frozen = check_fit_config(fit_args)
    job.check_trainer(trainer)
    if yaml.safe_load(frozen).get("ckpt_path") is None:  # the job would refuse a used run directory: now
        check_fresh_run_dir(trainer.get("default_root_dir") or "runs/default")
    note = "the shape was not checked against a cluster (--no-cluster-check)" if args.no_cluster_check \
        else job.check_cluster()
    if note:
        print(f"ftlab: note: {note}", file=sys.stderr)
    est = warn_if_it_does_not_fit(args, job, fit_args) if job.gpus_per_node and not args.no_estimate else None
    if job.signal_lead is None:
        choose_signal_lead(job, trainer, fit_args, est)
    workdir = os.getcwd()
    run_dir = os.path.join(workdir, trainer.get("default_root_dir") or "runs/default")
    python = "python" if job.container else sys.executable
    script = render(Path(args.template).read_text(), job, run_dir=run_dir, workdir=workdir,
                    fit_args=["--config", os.path.join(run_dir, FROZEN_CONFIG)], python=python)
    return job, run_dir, frozen, script


def checkpoint_writers(strategy, nodes: int) -> int:
    """Nodes that write a checkpoint in parallel: all of them for sharded checkpoints (FSDP's default, ZeRO-3),
    else 1 (one file from rank 0; ZeRO-1/2, whose rank 0 writes all the weights, counted so too)."""
    if isinstance(strategy, str):
        return nodes if strategy == "fsdp" or strategy.startswith("deepspeed_stage_3") else 1
    if isinstance(strategy, dict):
        name = str(strategy.get("class_path", "")).rsplit(".", 1)[-1]
        init = strategy.get("init_args") or {}
        sharded = (name == "FSDP" and init.get("state_dict_type", "sharded") == "sharded"  # ftlab's
                   or name == "FSDPStrategy" and init.get("state_dict_type") == "sharded"  # Lightning's: full
                   or name == "ModelParallelStrategy" and init.get("save_distributed_checkpoint", True)
                   or "DeepSpeed" in name and init.get("stage") == 3)
        return nodes if sharded else 1
    return 1


def choose_signal_lead(job: SlurmJob, trainer: dict, fit_args: list[str], est: dict | None) -> None:
    """USR1's lead from the size of the checkpoint the job writes (parameter counts from the memory estimate's
    weightless model, or counted the same way); the 120 s minimum where they cannot be counted."""
    from ftlab.estimate.cli import estimate
    from ftlab.estimate.cli import parser as estimate_parser

    if est is None:
        try:
            est = estimate(estimate_parser().parse_args(["--no-activations", "--devices", str(job.tasks_per_node),
                                                         "--num-nodes", str(job.nodes)]), fit_args)
        except ConfigError as err:
            why = f"the minimum: the checkpoint size is unknown ({str(err)[:160]})"
            job.signal_lead, job.signal_lead_why = MIN_LEAD_S, why
            print(f"ftlab: warning: USR1 lead {MIN_LEAD_S} s, {job.signal_lead_why}; set --signal-lead for a large "
                  "model", file=sys.stderr)
            return
    writers = checkpoint_writers(trainer.get("strategy", "auto"), job.nodes)
    job.signal_lead, job.signal_lead_why = checkpoint_lead(est["total_params"], est["trainable_params"], writers)
    job.check_signal_lead()
    print(f"ftlab: USR1 lead {job.signal_lead} s: {job.signal_lead_why}", file=sys.stderr)


def warn_if_it_does_not_fit(args: argparse.Namespace, job: SlurmJob, fit_args: list[str]) -> dict | None:
    """The memory estimate for the job's shape on its GPUs: a warning when it does not fit (the job may
    still run, e.g. with a strategy option the estimate does not model). Returns the estimate."""
    from ftlab.estimate.cli import GPUS, GiB, estimate
    from ftlab.estimate.cli import parser as estimate_parser

    if args.gpu_type not in GPUS:
        print(f"ftlab: note: no memory estimate: --gpu-type {args.gpu_type!r} is not one of {', '.join(GPUS)}",
              file=sys.stderr)
        return None
    est = estimate(estimate_parser().parse_args(["--gpu", args.gpu_type, "--devices", str(job.gpus_per_node),
                                                 "--num-nodes", str(job.nodes)]), fit_args)
    need = est["total_bytes"] / GiB
    line = (f"{need:.1f} GiB per GPU of {est['memory_gib']:g} GiB ({args.gpu_type}, {est['strategy']} on "
            f"{est['devices']} GPUs, batch {est['batch_per_device']} x {est['seq_len']})")
    if est["fits"]:
        print(f"ftlab: memory estimate: {line}", file=sys.stderr)
    else:
        print(f"ftlab: warning: the memory estimate does not fit: {line}; shard more (--trainer.strategy fsdp or "
              "deepspeed_stage_3), lower data.batch_size, or use --trainer.precision bf16-true "
              "(details: python -m ftlab estimate)", file=sys.stderr)
    return est


def write_frozen(run_dir: str, frozen: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, FROZEN_CONFIG), "w") as f:
        f.write(frozen)


def main(argv: list[str]) -> None:
    action = argv[0] if argv[:1] in (["submit"], ["render"]) else None
    args, fit_overrides = parser(action).parse_known_args(argv[1:] if action else argv)
    if action:
        args.action = action
    job, run_dir, frozen, script = prepare(args, fit_overrides)
    frozen_path = os.path.join(run_dir, FROZEN_CONFIG)
    if args.action == "render":
        # the script runs the frozen config: written, so that the printed script can be submitted as it is
        write_frozen(run_dir, frozen)
        print(script, end="")
        print(f"ftlab: wrote {frozen_path}, the config this script runs (save the script and `sbatch` it; "
              "nothing was queued)", file=sys.stderr)
        return
    script_path = os.path.join(run_dir, SCRIPT)
    from ftlab.cli import parse_fit_config

    fit_args = [a for c in args.config for a in ("--config", c)] + fit_overrides
    dm = parse_fit_config(fit_args).datamodule
    mode, why = data_prep.choose(args.prepare, dm, args.container)
    if args.dry_run:
        print(script, end="")
        print(f"ftlab: dry run: data: {mode} ({why}); would write {script_path} and {frozen_path}, then run "
              f"`sbatch --parsable {shlex.quote(script_path)}`; nothing was queued", file=sys.stderr)
        return
    write_frozen(run_dir, frozen)
    with open(script_path, "w") as f:
        f.write(script)
    print(f"ftlab: data: {mode} ({why})", file=sys.stderr)
    after = []
    if mode == "local":
        data_prep.prepare_here(dm)
    elif mode == "job":
        python = "python" if job.container else sys.executable
        prep_id = data_prep.submit_job(data_prep.job_command(args, job, run_dir, os.getcwd(), frozen_path, python))
        print(f"submitted Slurm job {prep_id} (data preparation; the training job starts after it succeeds)")
        print(f"  log:     {run_dir}/prepare-{prep_id}.out")
        after = [f"--dependency=afterok:{prep_id}"]
    result = subprocess.run(["sbatch", "--parsable", *after, script_path], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused the job: {result.stderr.strip()} (script: {script_path})")
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted Slurm job {job_id}")
    print(f"  log:     {run_dir}/slurm-{job_id}.out")
    print(f"  run dir: {run_dir}")
    print(f"  watch:   squeue -j {job_id}; tail -f {shlex.quote(f'{run_dir}/slurm-{job_id}.out')}")
