"""Resume from a mid-epoch checkpoint reproduces the uninterrupted run: same batches, same dropout
masks, same losses, same final weights (fp32 on CPU)."""

import csv
import json
import os
import random
import shutil
import signal
import time

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from ftlab.cli import run_cli
from tests.conftest import assert_only_trained_weights, children, fit_args, run_ftlab, start_ftlab, wait_for


def losses(run):
    rows = list(csv.DictReader(next(run.glob("csv/*/metrics.csv")).open()))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def weights(run, policy):
    folder = run / "export" / ("merged" if policy == "Adapter" else "")
    return load_file(folder / "model.safetensors")


def logged(run):
    return ["--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={run}", "--trainer.logger.name=csv",
            "--trainer.log_every_n_steps=1"]


def test_mid_epoch_resume_is_exact_with_dropout(tmp_path, tiny_bert, reviews_csv):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["--model.policy.dropout=0.3", "--test_after_fit=false"]
    run_cli(fit_args(straight, tiny_bert, reviews_csv, *extra, *logged(straight), "--checkpoint.every_n_train_steps=13",
                     "--checkpoint.save_top_k=-1", policy="Adapter"))
    ckpt = straight / "checkpoints" / "epoch=1-step=13.ckpt"  # 10 steps per epoch: 3 batches into epoch 1
    assert_only_trained_weights(ckpt, "Adapter")
    # resumed with a worker process: it takes the batch sampler's first batches before Lightning sets the epoch
    run_cli(fit_args(resumed, tiny_bert, reviews_csv, *extra, *logged(resumed), f"--ckpt_path={ckpt}",
                     "--data.num_workers=1", policy="Adapter"))
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(13, 20))
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(b)]
    for name, tensor in weights(straight, "Adapter").items():
        assert torch.equal(tensor, weights(resumed, "Adapter")[name]), name


def newest_losses(run):
    """Losses of the latest CSV log version (a resumed run writes a new one)."""
    path = max(run.glob("csv/*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(path.open()) if r.get("train/loss")}


def kill_one_rank_at_a_random_step(proc, checkpoints):
    wait_for(checkpoints / "last.ckpt", proc)
    time.sleep(random.uniform(0.0, 0.5))
    (rank1,) = children(proc.pid)
    os.kill(rank1, signal.SIGKILL)
    proc.communicate(timeout=120)  # rank 0 fails on the lost peer: it must not hang
    assert proc.returncode != 0


def kill_the_job_while_a_checkpoint_is_written(proc, checkpoints):
    wait_for(checkpoints / "last.ckpt", proc)
    while True:
        assert proc.poll() is None, "the run ended before a save could be interrupted"
        if list(checkpoints.glob("*.partial")):
            # stopped first: a save that ended between the look and the kill would leave nothing half-written
            os.killpg(proc.pid, signal.SIGSTOP)
            if list(checkpoints.glob("*.partial")):
                break
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert list(checkpoints.glob("*.partial"))  # killed mid-save: a half-written checkpoint is left behind


@pytest.mark.parametrize("strategy, policy, kill", [
    ("ddp", "Full", kill_one_rank_at_a_random_step),
    ("fsdp", "Adapter", kill_the_job_while_a_checkpoint_is_written),
    ("deepspeed_stage_3", "Adapter", kill_the_job_while_a_checkpoint_is_written),
])
def test_killed_run_resumes_to_the_uninterrupted_run(tmp_path, tiny_models, reviews_csv, strategy, policy, kill):
    """kill -9 (a rank, or the whole job mid-save), then `--ckpt_path last`: the same losses from the resume
    point on and the same final weights as a run never interrupted (fp32 on CPU). The LoRA runs' sharded
    checkpoints hold no base weights: the resume takes them from the pretrained model."""
    model = tiny_models["llama"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = [f"--trainer.strategy={strategy}", "--trainer.devices=2", "--test_after_fit=false",
              "--trainer.max_epochs=4", *(["--model.policy.dropout=0"] if policy == "Adapter" else [])]
    out = run_ftlab(*fit_args(straight, model, reviews_csv, *common, *logged(straight), policy=policy), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    proc = start_ftlab(*fit_args(killed, model, reviews_csv, *common, *logged(killed),
                                 "--checkpoint.every_n_train_steps=1", "--collective_timeout=60", policy=policy))
    kill(proc, killed / "checkpoints")
    assert_only_trained_weights(killed / "checkpoints" / "last.ckpt", policy)
    out = run_ftlab(*fit_args(killed, model, reviews_csv, *common, *logged(killed), "--ckpt_path=last", policy=policy),
                    timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list((killed / "checkpoints").glob("*.partial"))  # never picked up, cleaned away
    a, b = losses(straight), newest_losses(killed)
    assert 0 < min(b) and max(b) == max(a) == 19  # resumed mid-run (4 epochs x 5 steps), ran to the end
    assert max(abs(a[s] - b[s]) for s in b) <= 1e-6, (a, b)
    for name, tensor in weights(straight, policy).items():
        torch.testing.assert_close(weights(killed, policy)[name], tensor, rtol=0, atol=1e-6)


def test_saves_are_atomic_and_crash_leftovers_are_never_resumed(tmp_path, tiny_bert, reviews_csv):
    run = tmp_path / "run"
    run_cli(fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=1", "--test_after_fit=false"))
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # no partial file left behind
    good = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]

    # what a crash mid-save leaves: a half-written partial file; and a crash between the two renames
    # of a folder swap: the previous folder moved aside (of the last checkpoint, and of a top-k one)
    (ckpts / "last.ckpt.partial").write_bytes(b"\x80\x02half a pickle")
    (ckpts / "last.ckpt").rename(ckpts / "last.ckpt.old")
    (ckpts / "epoch=0-step=10.ckpt.old").mkdir()
    (ckpts / "epoch=0-step=10.ckpt.old" / "meta.pt").write_bytes(b"x")
    resumed = run_cli(fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=2", "--ckpt_path=last",
                               "--test_after_fit=false"))
    # resumed from the intact checkpoint, put back before "last" was looked for (not started over)
    assert resumed.trainer.ckpt_path == str(ckpts / "last.ckpt")
    assert resumed.trainer.global_step == 2 * good
    names = sorted(p.name for p in ckpts.iterdir())
    assert "last.ckpt.partial" not in names and "epoch=0-step=10.ckpt" in names  # cleaned, and put back


def test_accumulation_resumed_mid_epoch_equals_the_straight_run_bit_for_bit(tmp_path, tiny_bert, reviews_csv):
    """accumulate_grad_batches 2, stopped at max_steps mid-epoch and resumed with a larger max_steps: the
    same samples, steps and weights as the run never stopped (before the fix the resume trained nothing and
    exited 0: Lightning had marked the stopped epoch finished). A resume at the limit says so."""
    common = ["--trainer.accumulate_grad_batches=2", "--trainer.max_epochs=1", "--test_after_fit=false",
              "--model.policy.dropout=0.2",  # dropout: the RNG state must come back too
              # a learning rate that does not depend on max_steps, which differs between the runs
              "--model.optim.schedule=constant", "--model.optim.warmup_ratio=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(fit_args(straight, tiny_bert, reviews_csv, *common, "--trainer.max_steps=4", policy="Adapter"))
    run_cli(fit_args(resumed, tiny_bert, reviews_csv, *common, "--trainer.max_steps=2", policy="Adapter"))
    cli = run_cli(fit_args(resumed, tiny_bert, reviews_csv, *common, "--trainer.max_steps=4", "--ckpt_path=last",
                           policy="Adapter"))
    assert cli.trainer.global_step == 4  # 10 batches per epoch: 5 steps; stopped at 2 and 4, both mid-epoch
    summaries = [json.loads((run / "summary.json").read_text()) for run in (straight, resumed)]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 4
    assert summaries[0]["train_samples"] == summaries[1]["train_samples"] == 4 * 2 * 16
    for name, tensor in weights(straight, "Adapter").items():
        assert torch.equal(tensor, weights(resumed, "Adapter")[name]), name

    # the run stopped after its last checkpoint, before its export and the summary naming it were written
    shutil.rmtree(resumed / "export")
    summary = json.loads((resumed / "summary.json").read_text())
    del summary["export"]
    (resumed / "summary.json").write_text(json.dumps(summary))
    out = run_ftlab(*fit_args(resumed, tiny_bert, reviews_csv, *common, "--trainer.max_steps=4", "--ckpt_path=last",
                              policy="Adapter"))
    assert out.returncode == 2 and "nothing to train" in out.stderr and "trainer.max_steps=4" in out.stderr, out.stderr[-2000:]
    assert f"its Hugging Face export was not written: python -m ftlab export --run {resumed}" in out.stderr, out.stderr[-2000:]
    assert "resuming with" not in out.stderr  # the same settings: nothing to say
    # another batch size mid-epoch: the rest of the epoch's order is made of batches of the saved size
    out = run_ftlab(*fit_args(resumed, tiny_bert, reviews_csv, *common, "--trainer.max_steps=5", "--ckpt_path=last",
                              "--data.batch_size=32", "--model.optim.lr=0.5", policy="Adapter"))
    assert out.returncode == 2 and "data.batch_size=32, but the checkpoint stopped mid-epoch with batch_size 16" in \
        out.stderr, out.stderr[-2000:]
    # a new learning rate is said not to be used (the checkpoint's optimizer and schedule go on)
    assert "ftlab: resuming with model.optim.lr=0.5, the run had " in out.stderr, out.stderr[-2000:]
    assert "the checkpoint's optimizer and schedule go on; the new value is not used" in out.stderr


class CrashAt(L.Callback):
    """Added to a test run: at the end of training batch `batch` of `epoch`, raises (a crash, a failed node), or
    with `stop`, asks the trainer to stop (as max_time and early stopping do, at any batch)."""

    def __init__(self, batch: int, stop: bool = False, epoch: int = 0):
        self.batch, self.stop, self.epoch = batch, stop, epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            if self.stop:
                trainer.should_stop = True
                return
            raise RuntimeError(f"simulated crash after batch {batch_idx}")


def test_default_checkpoints_follow_validation_at_step_ends_and_a_crash_resumes_exactly(tmp_path, tiny_bert,
                                                                                      reviews_csv):
    """With the default checkpoint options, `last` is saved at each validation, not only when training ends.
    A validation inside an accumulation window (10 batches an epoch, windows of 3, validation after batch 5)
    saves at the window's end: saved in its middle, the resume would start after the window's first batches,
    whose gradients no checkpoint holds, and never train them. Crashed after batch 7, resumed with
    `--ckpt_path last`: the same samples and weights as the run never stopped."""
    common = ["--trainer.accumulate_grad_batches=3", "--trainer.val_check_interval=0.5", "--test_after_fit=false",
              "--model.policy.dropout=0.2"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_cli(fit_args(straight, tiny_bert, reviews_csv, *common, policy="Adapter"))
    with pytest.raises(RuntimeError, match="simulated crash after batch 7"):
        run_cli(fit_args(crashed, tiny_bert, reviews_csv, *common, "--trainer.callbacks+=tests.test_checkpoints.CrashAt",
                         "--trainer.callbacks.batch=7", policy="Adapter"))
    saved = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2  # at the end of batch 6 (0-based 5), the window after the validation
    cli = run_cli(fit_args(crashed, tiny_bert, reviews_csv, *common, "--ckpt_path=last", policy="Adapter"))
    assert cli.trainer.global_step == 8  # 4 steps an epoch (3 + 3 + 3 + 1 batches)
    # stopped inside a window of epoch 1 (max_time, early stopping): the validation, the epoch's end and the
    # training's end that follow save nothing there; `last` stays at epoch 0's end
    stopped = tmp_path / "stopped"
    run_cli(fit_args(stopped, tiny_bert, reviews_csv, *common, "--trainer.val_check_interval=1.0",
                     "--trainer.callbacks+=tests.test_checkpoints.CrashAt", "--trainer.callbacks.batch=7",
                     "--trainer.callbacks.stop=true", "--trainer.callbacks.epoch=1", policy="Adapter"))
    saved = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4, saved["global_step"]  # saved mid-window, it was step 6, 8 batches in
    a, b = (json.loads((run / "summary.json").read_text()) for run in (straight, crashed))
    assert a["steps"] == b["steps"] == 8 and a["train_samples"] == b["train_samples"] == 2 * 160
    for name, tensor in weights(straight, "Adapter").items():
        assert torch.equal(tensor, weights(crashed, "Adapter")[name]), name


def test_sigterm_stops_with_a_failing_status_and_a_requeued_job_resumes_from_its_own_last(tmp_path, tiny_bert,
                                                                                          reviews_csv, monkeypatch):
    """SIGTERM (scancel, a preemption without USR1, a stopped pod) mid-fit: Lightning's bare SystemExit exited 0,
    so `fit && export` went on with an unfinished model. Then a requeued job (SLURM_RESTART_COUNT) that was
    submitted with `--ckpt_path` to an earlier checkpoint resumes from its own `last`, not from that one again
    (which rolled every requeue back to where the job first started)."""
    run = tmp_path / "run"
    every = ["--checkpoint.every_n_train_steps=5", "--checkpoint.save_top_k=-1", "--test_after_fit=false"]
    run_cli(fit_args(run, tiny_bert, reviews_csv, *every, "--trainer.max_epochs=1"))  # 10 steps
    earlier = run / "checkpoints" / "epoch=0-step=5.ckpt"
    proc = start_ftlab(*fit_args(run, tiny_bert, reviews_csv, *every, "--trainer.max_epochs=200",
                                 f"--ckpt_path={earlier}"))
    wait_for(run / "checkpoints" / "epoch=1-step=15.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by SIGTERM before the run finished" in err, (proc.returncode, err[-2000:])
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped_at >= 15
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    cli = run_cli(fit_args(run, tiny_bert, reviews_csv, *every, f"--trainer.max_steps={stopped_at + 2}",
                           "--trainer.max_epochs=200", f"--ckpt_path={earlier}"))
    assert os.path.basename(cli.trainer.ckpt_path) == "last.ckpt", cli.trainer.ckpt_path
    assert cli.trainer.global_step == stopped_at + 2


def test_fsdp_checkpoint_of_two_ranks_continues_on_one_in_the_same_global_order(tmp_path, tiny_models, reviews_csv):
    """2 ranks to step 3 (mid-epoch), then 1 rank with accumulation 2 (the same global batch): it trains
    the remaining steps on the global batches the 2 ranks would have taken, so it ends where a 2-rank run
    never stopped ends. And the other way: 1 rank accumulating 2 to step 3, then 2 ranks."""
    model = tiny_models["llama"]
    straight, moved, grown = tmp_path / "straight", tmp_path / "moved", tmp_path / "grown"
    # the learning rate must not depend on max_steps, which only the stopped run sets
    schedule = ["--model.optim.schedule=constant", "--model.optim.warmup_ratio=0", "--test_after_fit=false",
                "--trainer.max_epochs=2"]
    two = ["--trainer.strategy=fsdp", "--trainer.devices=2", *schedule]
    out = run_ftlab(*fit_args(straight, model, reviews_csv, *two), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_ftlab(*fit_args(moved, model, reviews_csv, *two, "--trainer.max_steps=3"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (moved / "checkpoints" / "last.ckpt" / ".metadata").exists()  # sharded by 2 ranks
    out = run_ftlab(*fit_args(moved, model, reviews_csv, "--trainer.strategy=fsdp", "--trainer.devices=1",
                              "--trainer.accumulate_grad_batches=2", *schedule, "--ckpt_path=last"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one = ["--trainer.strategy=fsdp", "--trainer.devices=1", "--trainer.accumulate_grad_batches=2", *schedule]
    out = run_ftlab(*fit_args(grown, model, reviews_csv, *one, "--trainer.max_steps=3"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_ftlab(*fit_args(grown, model, reviews_csv, *two, "--ckpt_path=last"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b, c = (json.loads((run / "summary.json").read_text()) for run in (straight, moved, grown))
    assert a["steps"] == b["steps"] == c["steps"] == 10 and b["world_size"] == 1 and c["world_size"] == 2
    # every row of both epochs once, none twice
    assert a["train_samples"] == b["train_samples"] == c["train_samples"] == 160 * 2
    for name, tensor in weights(straight, "Full").items():
        torch.testing.assert_close(weights(moved, "Full")[name], tensor, rtol=0, atol=2e-5)
        torch.testing.assert_close(weights(grown, "Full")[name], tensor, rtol=0, atol=2e-5)


def test_a_resume_refuses_a_base_model_other_than_the_one_its_frozen_weights_came_from(tmp_path, tiny_models,
                                                                                       reviews_csv):
    """A LoRA checkpoint leaves the base out: resumed over other base weights (a local folder overwritten, a hub
    repository updated), it would train on without a word. Refused in one line instead; the same base resumes."""
    import shutil

    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(tiny_models["bert"], base)
    common = ["--test_after_fit=false", "--model.policy.dropout=0"]
    out = run_ftlab(*fit_args(run, base, reviews_csv, *common, "--trainer.max_epochs=1", policy="Adapter"))
    assert out.returncode == 0, out.stderr[-3000:]
    shutil.copy(tiny_models["llama"] / "model.safetensors", base)  # other weights in the same folder
    out = run_ftlab(*fit_args(run, base, reviews_csv, *common, "--ckpt_path=last", policy="Adapter"))
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "its weight files are not those the checkpoint was written against" in last and str(base) in last, last
    out = run_ftlab("export", f"--run={run}", f"--out={tmp_path / 'export'}")  # the export reads the base too
    assert out.returncode == 2 and "export with the base model the run started from" in out.stderr, out.stderr[-2000:]


def test_the_module_with_its_checkpoint_hooks_pickles_as_spawned_ranks_need(tiny_bert):
    """ddp_spawn pickles the LightningModule to each rank: hooks that are closures cannot be pickled."""
    import pickle

    from ftlab.module import FineTuneModule
    from ftlab.policies import Adapter

    module = pickle.loads(pickle.dumps(FineTuneModule(str(tiny_bert), policy=Adapter())))
    assert module._state_dict_hooks and module._load_state_dict_post_hooks  # the hooks came along
