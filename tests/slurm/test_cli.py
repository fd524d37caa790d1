"""`ftlab slurm render|submit --dry-run`: the rendered script and every check made before sbatch."""

from __future__ import annotations

import shlex
import subprocess

import pytest
import yaml

from ftlab.__main__ import main
from tests.conftest import REPO, run_ftlab
from tests.slurm.conftest import write_config

SHAPE = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10", "--signal-lead", "30"]


def settings(script: str) -> list[str]:
    """FTLAB_ARGS, PYTHON, CONTAINER, WORKDIR as bash itself reads them from the rendered script."""
    block = script.split("# >>> ftlab settings", 1)[1].split("# <<< ftlab settings", 1)[0]
    out = subprocess.run(["bash", "-c", block + '\nprintf "%s\\n" "${FTLAB_ARGS[@]}" "$PYTHON" "$WORKDIR"'],
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_render_fills_the_shape_and_quotes_every_value(tmp_path, tiny_bert, reviews_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = f"runs/it's a $(touch {tmp_path}/pwned) `id` run"
    cfg = write_config(tmp_path / "x.yaml", run, tiny_bert, reviews_csv)
    assert main(["slurm", "render", "--config", str(cfg), *SHAPE, "--no-cluster-check",
                 "--trainer.max_epochs", "3"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --time=10", "#SBATCH --signal=USR1@30", "#SBATCH --requeue"):
        assert line in script.splitlines()
    assert "--gpus-per-node" not in "".join(line for line in script.splitlines() if line.startswith("#SBATCH"))
    assert "# USR1 30 s before the time limit: given with --signal-lead" in script.splitlines()
    args = settings(script)
    assert args[:2] == ["--config", f"{tmp_path}/{run}/submitted-config.yaml"]
    assert args[3] == str(tmp_path)
    assert not (tmp_path / "pwned").exists()
    # render writes the frozen config its script runs, and nothing else
    assert [p.name for p in (tmp_path / run).iterdir()] == ["submitted-config.yaml"]
    assert "max_epochs: 3" in (tmp_path / run / "submitted-config.yaml").read_text()


def test_render_for_a_gpu_cluster(tmp_path, tiny_bert, reviews_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "x.yaml", "runs/big", tiny_bert, reviews_csv, accelerator="auto")
    assert main(["slurm", "render", "--config", str(cfg), "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                 "--account", "proj1", "--container", "nvcr.io/nvidia/pytorch:25.01-py3", "--sbatch-arg=--exclusive",
                 "--no-cluster-check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj1", "#SBATCH --exclusive", "#SBATCH --job-name=big"):
        assert line in lines
    assert "CONTAINER=nvcr.io/nvidia/pytorch:25.01-py3" in lines


def test_srun_gets_the_cpus_per_task_of_the_job(tmp_path, tiny_bert, reviews_csv, capsys, monkeypatch):
    """srun (Slurm >= 22.05) does not inherit sbatch's --cpus-per-task; the script hands it over through
    SRUN_CPUS_PER_TASK, which bash sets from the job's SLURM_CPUS_PER_TASK before srun runs."""
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "x.yaml", "runs/cpus", tiny_bert, reviews_csv)
    assert main(["slurm", "render", "--config", str(cfg), *SHAPE, "--cpus-per-task", "6", "--no-cluster-check"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=6" in script.splitlines()
    head = script.split('"${SRUN[@]}"', 1)[0]  # everything before srun, without running srun
    assert "SRUN_CPUS_PER_TASK" in head
    for given, expected in (("6", "6"), (None, "unset")):
        env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_NTASKS_PER_NODE": "1", **({"SLURM_CPUS_PER_TASK": given} if given else {})}
        out = subprocess.run(["bash", "-c", head + '\necho "${SRUN_CPUS_PER_TASK-unset}"'], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[-1] == expected


def test_default_signal_lead_comes_from_the_checkpoint_size(tmp_path, tiny_bert, reviews_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "x.yaml", "runs/lead", tiny_bert, reviews_csv)
    shape = [a for a in SHAPE if a not in ("--signal-lead", "30")]
    assert main(["slurm", "render", "--config", str(cfg), *shape, "--time", "60", "--no-cluster-check"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert "#SBATCH --signal=USR1@120" in lines  # a tiny model's checkpoint writes in well under the minimum
    [why] = [line for line in lines if line.startswith("# USR1 120 s before the time limit: checkpoint ~0.0 GB")]
    assert "at least 120 s" in why and "written by 1 node(s)" in why
    assert "ftlab: USR1 lead 120 s: checkpoint ~0.0 GB" in out.err


def test_checkpoint_lead_of_a_70b_model():
    from ftlab.slurm.cli import checkpoint_writers
    from ftlab.slurm.job import checkpoint_lead

    n = 70_000_000_000
    # full fine-tuning: 4 + 8 bytes per parameter = 840 GB; one writer at 0.5 GB/s: 1680 s + 60 s
    assert checkpoint_lead(n, n, writers=1)[0] == 1740
    # sharded over 8 nodes: 210 s + 60 s
    assert checkpoint_lead(n, n, writers=8)[0] == 270
    # LoRA (0.2% trainable): the frozen base is left out of checkpoints: 12 bytes x 140M = 1.68 GB, 3.4 s + 60 s,
    # raised to the 120 s minimum (it was 623 s while checkpoints held the 280 GB base)
    lead, why = checkpoint_lead(n, n // 500, writers=1)
    assert lead == 120 and "~1.7 GB" in why and "frozen ones are left out" in why
    assert checkpoint_lead(1_000_000, 1_000_000)[0] == 120  # never below the minimum
    assert checkpoint_writers("fsdp", 8) == 8 and checkpoint_writers("deepspeed_stage_3_offload", 8) == 8
    assert checkpoint_writers("ddp", 8) == checkpoint_writers("deepspeed_stage_2", 8) == 1
    assert checkpoint_writers({"class_path": "ftlab.strategies.FSDP", "init_args": {"state_dict_type": "full"}}, 8) == 1


def test_dry_run_queues_and_writes_nothing(tmp_path, tiny_bert, reviews_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "x.yaml", "runs/dry", tiny_bert, reviews_csv)
    assert main(["slurm", "submit", "--dry-run", "--config", str(cfg), *SHAPE, "--no-cluster-check"]) == 0
    out = capsys.readouterr()
    assert "#SBATCH --nodes=2" in out.out and "nothing was queued" in out.err
    assert not (tmp_path / "runs").exists()


BAD = {
    "devices differ from tasks per node": (["--trainer.devices", "2"], SHAPE, "trainer.devices=2"),
    "num_nodes differs from --nodes": (["--trainer.num_nodes", "3"], SHAPE, "trainer.num_nodes=3"),
    "GPU accelerator without GPUs": (["--trainer.accelerator", "gpu"], SHAPE, "--gpus-per-node 0"),
    "CPU accelerator holding GPUs": ([], ["--nodes", "1", "--gpus-per-node", "4"], "trainer.accelerator=cpu"),
    "tasks differ from GPUs": ([], ["--gpus-per-node", "4", "--ntasks-per-node", "2"], "one task per GPU"),
    "bad time": ([], ["--gpus-per-node", "0", "--time", "two hours"], "'two hours' is not a Slurm time"),
    "signal after the limit": ([], ["--gpus-per-node", "0", "--time", "1", "--signal-lead", "120"], "--signal-lead 120"),
    "zero nodes": ([], ["--nodes", "0"], "--nodes 0"),
    "time shorter than the checkpoint lead": ([], ["--gpus-per-node", "0", "--time", "1"],
                                              "--time 1: the checkpoint needs a lead of 120 s"),
    "missing data path": (["--data.init_args.source", "/nonexistent/x.csv"], SHAPE, "'/nonexistent/x.csv' not found"),
    "missing model folder": (["--model.name_or_path", "/nonexistent/model"], SHAPE, "'/nonexistent/model'"),
    "missing apptainer image": ([], [*SHAPE, "--container", "/nonexistent/ftlab.sif"], "no such Apptainer image"),
    # the preparation job would run outside the image, fail, and leave the training job waiting on afterok
    "preparation job in a container": ([], [*SHAPE, "--container", "nvcr.io/ftlab:1", "--prepare", "job"],
                                       "--prepare job with --container 'nvcr.io/ftlab:1'"),
    "ZeRO with gradual unfreezing": (["--model.policy", "Freeze", "--model.policy.unfreeze_every", "1",
                                      "--trainer.strategy", "deepspeed_stage_2"], SHAPE, "cannot run under DeepSpeed"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_job_is_refused_before_sbatch(name, tmp_path, tiny_bert, reviews_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides, shape, expected = BAD[name]
    cfg = write_config(tmp_path / "x.yaml", "runs/bad", tiny_bert, reviews_csv)
    assert main(["slurm", "submit", "--config", str(cfg), *shape, "--no-cluster-check", *overrides]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_command_line_error_is_one_line(tmp_path, tiny_bert, reviews_csv):
    cfg = write_config(tmp_path / "x.yaml", str(tmp_path / "runs/bad"), tiny_bert, reviews_csv)
    out = run_ftlab("slurm", "submit", "--config", str(cfg), *SHAPE, "--trainer.devices", "2")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("ftlab: error: trainer.devices=2")
    assert "Traceback" not in out.stderr


def test_no_secret_and_no_shell_in_what_submit_writes(tmp_path, tiny_bert, reviews_csv, capsys, monkeypatch):
    """A W&B key in the environment reaches the job through it, never through a file; a value with shell
    syntax in an override stays a value."""
    secret = "fake-wandb-key-5f4dcc3b5aa765d61d8327deb882cf99"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "x.yaml", "runs/sec", tiny_bert, reviews_csv)
    sneaky = f"x$(touch {tmp_path}/pwned)`id`;rm -rf ~"
    assert main(["slurm", "submit", "--dry-run", "--config", str(cfg), *SHAPE, "--no-cluster-check",
                 "--trainer.logger=WandbLogger", "--trainer.logger.project=p", f"--trainer.logger.name={sneaky}"]) == 0
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    from ftlab.slurm.cli import parser, prepare

    args, rest = parser().parse_known_args(["submit", "--config", str(cfg), *SHAPE, "--no-cluster-check",
                                            "--trainer.logger=WandbLogger", f"--trainer.logger.name={sneaky}"])
    _, _, frozen, script = prepare(args, rest)
    assert secret not in frozen + script
    assert sneaky not in script  # overrides go into the frozen config, not into the shell script
    import yaml

    assert yaml.safe_load(frozen)["trainer"]["logger"]["init_args"]["name"] == sneaky
    assert not (tmp_path / "pwned").exists()


def test_submit_warns_when_the_memory_estimate_does_not_fit(tmp_path, tiny_bert, reviews_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "x.yaml", "runs/big", tiny_bert, reviews_csv, accelerator="auto")
    gpus = ["--nodes", "2", "--gpus-per-node", "4", "--no-cluster-check", "--data.init_args.label_names=[neg, pos]"]
    assert main(["slurm", "render", "--config", str(cfg), *gpus, "--gpu-type", "T4"]) == 0
    assert "ftlab: memory estimate: 0.0 GiB per GPU of 16 GiB (T4, ddp on 8 GPUs" in capsys.readouterr().err
    assert main(["slurm", "render", "--config", str(cfg), *gpus, "--data.init_args.batch_size=3000000"]) == 0
    err = capsys.readouterr().err
    assert "ftlab: warning: the memory estimate does not fit" in err and "of 80 GiB (H100" in err


def readme_slurm_commands() -> list[str]:
    """The commands of the README's Slurm example, as written (continuation lines joined)."""
    text = (REPO / "README.md").read_text().split("## Run on Slurm", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [c.strip() for c in text.replace("\\\n", " ").splitlines() if c.strip()]


def test_the_readme_slurm_commands_run_with_the_shipped_config(tmp_path, capsys, monkeypatch):
    """The README's submit and render, literally (with --dry-run and --no-cluster-check: this machine has no
    GPU partition), on the shipped config: `devices: auto` fits any --gpus-per-node."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    commands = readme_slurm_commands()
    assert [c.split()[:5] for c in commands] == [["python", "-m", "ftlab", "slurm", "submit"],
                                                 ["python", "-m", "ftlab", "slurm", "render"]]
    submit, render = (shlex.split(c, comments=True)[3:] for c in commands)
    assert main([*submit, "--dry-run", "--no-cluster-check"]) == 0
    assert "#SBATCH --ntasks-per-node=8" in capsys.readouterr().out
    assert render[-2] == ">"
    assert main([*render[:-2], "--no-cluster-check"]) == 0
    out = capsys.readouterr()
    (tmp_path / render[-1]).write_text(out.out)
    frozen = tmp_path / "runs/quickstart-full/submitted-config.yaml"
    assert f"ftlab: wrote {frozen}" in out.err
    assert yaml.safe_load(frozen.read_text())["trainer"]["devices"] == "auto"
    assert settings((tmp_path / render[-1]).read_text())[:2] == ["--config", str(frozen)]  # the script runs it
    # `--trainer.devices null` means auto; a number that differs names the fix
    assert main([*render[:-2], "--no-cluster-check", "--trainer.devices", "null"]) == 0
    capsys.readouterr()
    assert main([*render[:-2], "--no-cluster-check", "--trainer.devices", "1"]) == 2
    assert "or set trainer.devices to auto (--trainer.devices auto)" in capsys.readouterr().err


def test_submit_refuses_a_run_dir_that_holds_a_run(tmp_path, tiny_bert, reviews_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "x.yaml", "runs/used", tiny_bert, reviews_csv)
    (tmp_path / "runs/used/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/used/checkpoints/last.ckpt").write_text("x")
    assert main(["slurm", "submit", "--dry-run", "--config", str(cfg), *SHAPE, "--no-cluster-check"]) == 2
    assert "already holds a run (checkpoints/): resume it with --ckpt_path last" in capsys.readouterr().err
    assert main(["slurm", "submit", "--dry-run", "--config", str(cfg), *SHAPE, "--no-cluster-check",
                 "--ckpt_path", "last"]) == 0
