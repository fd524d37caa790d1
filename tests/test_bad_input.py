"""Each user error stops before training with one clear line naming the bad value, exit code 2, and no
traceback."""

import pytest

from tests.conftest import fit_args, run_ftlab

CASES = {
    "unknown key": (["--model.polciy=Full"], "polciy"),
    "wrong type": (["--data.batch_size=many"], "batch_size"),
    "missing data file": (["--data.source=/nonexistent/reviews.csv"], "data file '/nonexistent/reviews.csv' not found"),
    "missing column": (["--data.text_column=review"], "column 'review' is not in the train data"),
    "label outside label names": (["--data.label_names=[neg,meh]"], "'pos' (") ,
    "unknown peft method": (["--model.policy=Adapter", "--model.policy.method=lorra"], "did you mean 'lora'"),
    "target module matching nothing": (["--model.policy=Adapter", "--model.policy.target_modules=[q_proj]"],
                                       "'q_proj' matches no module"),
    "freeze pattern matching nothing": (["--model.policy=Freeze", "--model.policy.trainable=[nothing_here]"],
                                        "'nothing_here' matches no parameter"),
    "missing model": (["--model.name_or_path=/nonexistent/model"], "/nonexistent/model"),
    "negative lr": (["--model.optim.lr=-1"], "lr=-1"),
    "gradual unfreezing under ZeRO": (["--model.policy=Freeze", "--model.policy.unfreeze_every=1",
                                       "--trainer.strategy=deepspeed_stage_2", "--trainer.devices=2"],
                                      "cannot run under DeepSpeed ZeRO"),
    "hybrid sharding without replicas": (["--trainer.strategy=ftlab.strategies.FSDP",
                                          "--trainer.strategy.sharding=hybrid"], "needs replicate_size"),
}


@pytest.mark.parametrize("name", CASES)
def test_user_error(name, tmp_path, tiny_bert, reviews_csv):
    extra, expected = CASES[name]
    out = run_ftlab(*fit_args(tmp_path / "run", tiny_bert, reviews_csv, *extra), "--trainer.max_epochs=50")
    assert out.returncode == 2, (name, out.stdout[-2000:], out.stderr[-3000:])
    assert expected in out.stderr, (name, out.stderr[-3000:])
    assert "Traceback" not in out.stderr + out.stdout, (name, out.stderr[-3000:])
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training
