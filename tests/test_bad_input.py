"""Each user error stops before training with one clear line naming the bad value, exit code 2, and no
traceback."""

# datasets and transformers are imported here, at collection, so that the log handlers they make bind to
# the session's stderr, not to one test's capture (closed after that test).
import datasets  # noqa: F401
import pytest
import transformers  # noqa: F401

import ftlab.cli  # noqa: F401
from ftlab.__main__ import main
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
    "config override of no field": (['--model.config_overrides={"num_hiden_layers": 1}'],
                                    "['num_hiden_layers'] are not fields of the bert config"),
    "gradual unfreezing under ZeRO": (["--model.policy=Freeze", "--model.policy.unfreeze_every=1",
                                       "--trainer.strategy=deepspeed_stage_2", "--trainer.devices=2"],
                                      "cannot run under DeepSpeed ZeRO"),
    "hybrid sharding without replicas": (["--trainer.strategy=ftlab.strategies.FSDP",
                                          "--trainer.strategy.sharding=hybrid"], "needs replicate_size"),
    # refused by both ranks as the data is set up, before the model loads
    "a validation split smaller than the ranks": (["--data.val_size=1", "--trainer.devices=2",
                                                   "--trainer.strategy=ddp"],
                                                  "the validation split of 1 row(s) cannot be shared by 2 ranks"),
    "fewer training batches than ranks": (["--data.batch_size=160", "--trainer.devices=2", "--trainer.strategy=ddp"],
                                          "makes 1 batch(es) of data.batch_size=160, fewer than the 2 ranks"),
}


@pytest.mark.parametrize("name", CASES)
def test_user_error(name, tmp_path, tiny_bert, reviews_csv):
    extra, expected = CASES[name]
    out = run_ftlab(*fit_args(tmp_path / "run", tiny_bert, reviews_csv, *extra), "--trainer.max_epochs=50")
    assert out.returncode == 2, (name, out.stdout[-2000:], out.stderr[-3000:])
    assert expected in out.stderr, (name, out.stderr[-3000:])
    assert "Traceback" not in out.stderr + out.stdout, (name, out.stderr[-3000:])
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training
    assert "ftlab: policy" not in out.stderr  # and before the model was built


# More of the catalogue, run in-process through the same entry point (`ftlab.__main__.main`): each fails
# before training, so no rank is launched, and one process can check many cases quickly.
MORE = {
    "missing required model": ([], "model.name_or_path is required but not given"),
    "wrong type of a trainer option": (["--trainer.max_epochs=abc"], "trainer.max_epochs=abc: expected int"),
    "value outside a choice": (["--model.optim.schedule=cosin"], "model.optim.schedule=cosin: expected one of"),
    "unknown attention kernel": (["--model.attn_implementation=flash"],
                                 "model.attn_implementation='flash' is not an attention kernel"),
    "flash attention on CPU": (["--model.attn_implementation=flash_attention_2", "--trainer.precision=bf16-mixed"],
                               "model.attn_implementation=flash_attention_2 "),
    "compile under DeepSpeed": (["--model.compile=true", "--trainer.strategy=deepspeed_stage_2"],
                                "model.compile=true under DeepSpeed"),
    "zero batch size": (["--data.batch_size=0"], "data.batch_size=0"),
    "zero max length": (["--data.max_length=0"], "data.max_length=0"),
    "negative validation size": (["--data.val_size=-1"], "data.val_size=-1"),
    "zero training rows": (["--data.max_train_rows=0"], "data.max_train_rows=0"),
    "negative workers": (["--data.num_workers=-1"], "data.num_workers=-1"),
    "empty data file": (["--data.source={empty}"], "has no rows"),
    "0-byte data file": (["--data.source={zero}"], "zero.csv is empty (0 bytes); give a file with a header and rows"),
    "non-UTF-8 data file": (["--data.source={latin1}"], "is not UTF-8 text"),
    "unknown file format": (["--data.source={xlsx}"], "unknown format '.xlsx'"),
    "missing label column": (["--data.label_column=lab"], "column 'lab' is not in the train data"),
    "filter value in no row": (["--data.keep_rows={{label: [poss, neg]}}"],
                               "data.keep_rows.label: 'poss' is in no row's 'label'; did you mean 'pos'?"),
    "filter on a missing column": (["--data.keep_rows={{genre: [x]}}"], "column 'genre' is not in the train data"),
    "duplicate label names": (["--data.label_names=[pos,pos]"], "has duplicates"),
    "not a dtype": (["--model.dtype=float33"], "model.dtype='float33' is not a torch dtype"),
    "strategy option after its name": (["--trainer.strategy=fsdp", "--trainer.strategy.state_dict_type=full"],
                                       "trainer.strategy is given by name ('fsdp'), which takes no options; give its "
                                       "class: --trainer.strategy=ftlab.strategies.FSDP --trainer.strategy.state_dict_type=full"),
    "strategy typo": (["--trainer.strategy=fsdpp", "--trainer.devices=2"], "did you mean 'fsdp'"),
    "devices the Trainer refuses": (["--trainer.devices=abc"], "trainer: `devices` selected"),
    "zero LoRA rank": (["--model.policy=Adapter", "--model.policy.r=0"], "policy.r=0"),
    "more top layers than the model has": (["--model.policy=Freeze", "--model.policy.top_k_layers=99"],
                                           "the model has 2 blocks"),
    "warmup longer than the run": (["--model.optim.warmup_ratio=2"], "warmup_ratio=2.0"),
    "negative skip allowance": (["--model.skip_nonfinite_steps=-1"], "skip_nonfinite_steps=-1"),
    "skipping steps under DeepSpeed": (["--model.skip_nonfinite_steps=2", "--trainer.strategy=deepspeed_stage_2",
                                        "--trainer.devices=2"], "DeepSpeed cannot skip a step"),
    "skipping steps under anomaly detection": (["--model.skip_nonfinite_steps=1", "--trainer.detect_anomaly=true"],
                                               "model.skip_nonfinite_steps=1 with trainer.detect_anomaly=true"),
    "zero collective timeout": (["--collective_timeout=0"], "collective_timeout=0"),
    "negative progress interval": (["--progress.every_n_seconds=-5"], "progress.every_n_seconds=-5.0 is not"),
    "endless progress interval": (["--progress.every_n_seconds=inf"], "progress.every_n_seconds=inf: expected float"),
    "missing checkpoint to resume": (["--ckpt_path=/nonexistent.ckpt"], "ckpt_path='/nonexistent.ckpt' does not exist"),
    "checkpoint that is another file": (["--ckpt_path={bad_yaml}"], "bad.yaml' is not a checkpoint (not a torch.save"),
    "time-based validation on two ranks": (["--trainer.val_check_interval=00:00:00:05", "--trainer.devices=2",
                                            "--trainer.strategy=ddp"], "is a time, which each of the 2 ranks reads"),
    "saving on an exception on two ranks": (["--checkpoint.save_on_exception=true", "--trainer.devices=2",
                                             "--trainer.strategy=ddp"], "checkpoint.save_on_exception=true on more"),
    "policy class typo": (["--model.policy=Freez"], "model.policy=Freez: no such class; did you mean 'Freeze'?"),
    "data class typo": (["--data=TextClasificationData"], "data=TextClasificationData: no such class; did you mean "
                                                          "'TextClassificationData'"),
    "misspelt option in a config mapping": (['--model.optim={{"lr": 0.01, "learning_rate": 0.1}}'],
                                            "model.optim.learning_rate: Optim has no such option; choose from 'name', "
                                            "'lr'"),
    "rows longer than the model's positions": (["--data.max_length=100", "--data.source={long}"],
                                               "data.max_length=100 makes rows of up to 92 tokens, longer than the "
                                               "64 positions the model has"),
    "YAML syntax error in a config file": (["--config={bad_yaml}"], "bad.yaml, line 4, column 4: not valid YAML ("),
    "checkpoints written in the background": (["--trainer.plugins=AsyncCheckpointIO"],
                                              "trainer.plugins AsyncCheckpointIO: ftlab swaps each checkpoint in"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-files")
    (root / "empty.csv").write_text("text,label\n")
    (root / "latin1.csv").write_bytes("text,label\ncaf\xe9 cr\xe8me,pos\nfine,neg\n".encode("latin-1"))
    (root / "reviews.xlsx").write_text("not a spreadsheet")
    (root / "zero.csv").write_bytes(b"")
    (root / "long.csv").write_text("text,label\n" + "".join(f"{' '.join(['lovely'] * 90)},pos\n{' '.join(['dull'] * 90)},"
                                                            f"neg\n" for _ in range(60)))
    (root / "bad.yaml").write_text("model:\n  optim:\n    lr: 0.01\n   warmup_steps: 3\n")  # one space short
    return {"empty": root / "empty.csv", "latin1": root / "latin1.csv", "xlsx": root / "reviews.xlsx",
            "bad_yaml": root / "bad.yaml", "zero": root / "zero.csv",
            "long": root / "long.csv"}


@pytest.mark.parametrize("name", MORE)
def test_more_user_errors(name, tmp_path, tiny_bert, reviews_csv, bad_files, capsys):
    extra, expected = MORE[name]
    args = fit_args(tmp_path / "run", tiny_bert, reviews_csv, *(a.format(**bad_files) for a in extra))
    if name == "missing required model":
        args = [a for a in args if not a.startswith("--model.name_or_path")]
    assert main(args) == 2, name
    err = capsys.readouterr().err
    assert expected in err, (name, err[-2000:])
    assert "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_catalogue_has_forty_cases():
    from tests.slurm.test_cli import BAD as SLURM_BAD
    from tests.slurm.test_cluster import test_shape_the_cluster_cannot_hold_is_refused as cluster_shapes

    shapes = cluster_shapes.pytestmark[0].args[1]
    assert len(CASES) + len(MORE) + len(SLURM_BAD) + len(shapes) >= 40
