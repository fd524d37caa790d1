import json

import pytest

from ftlab.errors import ConfigError
from ftlab.policies import Freeze
from ftlab.tasks import SequenceClassification
from tests.policies.helpers import load, trainable


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_linear_probe_trains_only_the_head(tiny_models, kind):
    model = Freeze().apply(load(tiny_models[kind]), SequenceClassification())
    names = trainable(model)
    assert names and all(n.startswith(("classifier", "score")) for n in names)
    assert len(names) < len(list(model.parameters()))


@pytest.mark.parametrize("kind,block", [("bert", "bert.encoder.layer.1."), ("llama", "model.layers.1."),
                                        ("gpt2", "transformer.h.1.")])
def test_top_k_layers_trains_the_top_block_and_head(tiny_models, kind, block):
    model = Freeze(top_k_layers=1).apply(load(tiny_models[kind]), SequenceClassification())
    names = trainable(model)
    assert any(n.startswith(block) for n in names)
    top_block = {n for n, _ in model.named_parameters() if n.startswith(block)}
    assert top_block <= names
    below = {n for n in names if not n.startswith(block) and not n.startswith(("classifier", "score"))}
    assert below == set()


def test_patterns_add_named_parameters(tiny_bert):
    model = Freeze(trainable=["pooler", r"LayerNorm"]).apply(load(tiny_bert), SequenceClassification())
    names = trainable(model)
    assert {"bert.pooler.dense.weight", "bert.embeddings.LayerNorm.weight", "classifier.weight"} <= names
    assert "bert.encoder.layer.0.attention.self.query.weight" not in names


def test_pattern_that_matches_nothing_is_refused(tiny_bert):
    policy = Freeze(trainable=["no_such_module"])
    with pytest.raises(ConfigError, match="no_such_module.*matches no parameter"):
        policy.validate(load(tiny_bert), SequenceClassification())


def test_top_k_larger_than_the_model_is_refused(tiny_bert):
    with pytest.raises(ConfigError, match="top_k_layers=5 but the model has 2 blocks"):
        Freeze(top_k_layers=5).validate(load(tiny_bert), SequenceClassification())


def test_gradual_unfreezing_adds_one_block_per_period(tiny_bert):
    policy = Freeze(unfreeze_every=1)
    model = policy.apply(load(tiny_bert), SequenceClassification())
    assert not any(n.startswith("bert.encoder.layer.") for n in trainable(model))
    # the optimizer gets every parameter that will train, up front
    grouped = {n for g in policy.param_groups(model, 1e-3, 0.0) for n in g["names"]}
    assert any(n.startswith("bert.encoder.layer.0.") for n in grouped)
    assert policy.on_epoch_start(model, 0) == []
    changed = policy.on_epoch_start(model, 1)
    assert changed and all(n.startswith("bert.encoder.layer.1.") for n in changed)
    policy.on_epoch_start(model, 2)
    assert any(n.startswith("bert.encoder.layer.0.") for n in trainable(model))
    assert not any(n.startswith("bert.embeddings.") for n in trainable(model))


def test_layer_wise_lr_decay(tiny_bert):
    policy = Freeze(top_k_layers=2, layer_lr_decay=0.5)
    model = policy.apply(load(tiny_bert), SequenceClassification())
    lr_of = {n: g["lr"] for g in policy.param_groups(model, 1.0, 0.01) for n in g["names"]}
    assert lr_of["classifier.weight"] == 1.0
    assert lr_of["bert.encoder.layer.1.attention.self.query.weight"] == 0.5
    assert lr_of["bert.encoder.layer.0.attention.self.query.weight"] == 0.25


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="layer_lr_decay=1.5"):
        Freeze(layer_lr_decay=1.5)
    with pytest.raises(ConfigError, match="top_k_layers=-1"):
        Freeze(top_k_layers=-1)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        Freeze(trainable=["("])


@pytest.mark.parametrize("strategy", [(), ("--trainer.strategy=fsdp", "--trainer.devices=2")])
def test_gradual_unfreezing_resumed_between_unfreezings_ends_as_the_straight_run(tmp_path, tiny_bert, reviews_csv,
                                                                                strategy):
    """Stopped in the middle of the second epoch (one block unfrozen at its start) and resumed to the end of the
    third: the checkpoint holds what trains in the run (the head, the block trained so far, the block still to
    unfreeze) but not the frozen embeddings; the resumed run trains the block unfrozen before the save again
    (Lightning skips the start of the epoch it resumes in, where unfreezing happens: that block stayed frozen)
    and unfreezes the next one on time: it ends where the run never stopped ends."""
    import torch
    from safetensors.torch import load_file

    from tests.conftest import fit_args, run_ftlab, saved_weights

    common = ["--model.policy.unfreeze_every=1", "--test_after_fit=false", "--model.optim.schedule=constant",
              "--model.optim.warmup_ratio=0", *strategy]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stop = ["--trainer.max_epochs=3", f"--trainer.max_steps={7 if strategy else 15}"]  # mid-epoch 1 (5 or 10 an epoch)
    for run, extra in ((straight, ["--trainer.max_epochs=3"]), (resumed, stop),
                       (resumed, ["--trainer.max_epochs=3", "--ckpt_path=last"])):
        out = run_ftlab(*fit_args(run, tiny_bert, reviews_csv, *common, *extra, policy="Freeze"), timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        if extra == stop:
            saved = saved_weights(run / "checkpoints" / "last.ckpt")
            assert any(".layer.1." in n for n in saved) and any(".layer.0." in n for n in saved), sorted(saved)
            assert not any("word_embeddings" in n for n in saved), sorted(saved)
    summary = json.loads((resumed / "summary.json").read_text())
    steps = 30 // (2 if strategy else 1)
    assert summary["steps"] == steps and summary["train_samples"] == 3 * 160
    after = load_file(resumed / "export" / "model.safetensors")
    for name, tensor in load_file(straight / "export" / "model.safetensors").items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=1e-6, msg=name)
