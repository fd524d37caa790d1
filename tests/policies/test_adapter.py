import pytest

from ftlab.errors import ConfigError
from ftlab.policies import Adapter
from ftlab.tasks import SequenceClassification
from tests.policies.helpers import load, trainable


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_lora_targets_found_per_architecture_and_head_trains(tiny_models, kind):
    model = Adapter(method="lora", r=4).apply(load(tiny_models[kind]), SequenceClassification())
    names = trainable(model)
    lora = {n for n in names if "lora_" in n}
    assert lora, kind
    head = {n for n in names if "classifier" in n or "score" in n}
    assert head, kind
    assert names == lora | head
    # the backbone's own weights stay frozen
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.endswith("base_layer.weight") for n in frozen)


def test_dora_adds_magnitude_vectors(tiny_bert):
    model = Adapter(method="dora", r=4).apply(load(tiny_bert), SequenceClassification())
    assert any("lora_magnitude_vector" in n for n in trainable(model))


def test_explicit_targets_are_used(tiny_bert):
    model = Adapter(method="lora", r=2, target_modules=["key"]).apply(load(tiny_bert), SequenceClassification())
    lora = {n for n in trainable(model) if "lora_" in n}
    assert lora and all(".key." in n for n in lora)


@pytest.mark.parametrize("method,marker", [("ia3", "ia3_l"), ("prefix", "prompt_encoder"), ("prompt", "prompt_encoder")])
def test_other_peft_methods(tiny_models, method, marker):
    model = Adapter(method=method, num_virtual_tokens=4).apply(load(tiny_models["llama"]), SequenceClassification())
    assert any(marker in n for n in trainable(model)), trainable(model)


def test_unknown_method_names_the_closest(tiny_bert):
    with pytest.raises(ConfigError, match="'lorra' is not a peft method; did you mean 'lora'"):
        Adapter(method="lorra")


def test_target_that_matches_nothing_is_refused(tiny_bert):
    with pytest.raises(ConfigError, match="'q_proj' matches no module"):
        Adapter(target_modules=["q_proj"]).validate(load(tiny_bert), SequenceClassification())


def test_unknown_peft_option_is_refused():
    with pytest.raises(ConfigError, match="not fields of peft's LoraConfig"):
        Adapter(options={"rank_pattern_typo": 1})
