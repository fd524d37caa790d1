"""Helpers of the policy tests."""

from transformers import AutoModelForSequenceClassification


def load(path):
    """A tiny pretrained backbone with a fresh 2-label head, as a user's model loads."""
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}
