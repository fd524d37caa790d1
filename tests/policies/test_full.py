from transformers import AutoModelForSequenceClassification

from ftlab.policies import Full
from ftlab.tasks import SequenceClassification


def test_full_trains_every_weight(tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=2)
    for p in model.parameters():
        p.requires_grad_(False)
    model = Full().apply(model, SequenceClassification())
    assert all(p.requires_grad for p in model.parameters())


def test_no_decay_for_biases_and_norms(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    policy = Full()
    groups = Full().param_groups(policy.apply(model, SequenceClassification()), 1e-3, 0.1)
    decay_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert decay_of["bert.encoder.layer.0.attention.self.query.weight"] == 0.1
    assert decay_of["bert.encoder.layer.0.attention.self.query.bias"] == 0.0
    assert decay_of["bert.embeddings.LayerNorm.weight"] == 0.0
    assert len(decay_of) == sum(1 for _ in model.parameters())
