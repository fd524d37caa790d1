"""Data: sources, tokenisation cache, batching. `data` in a config takes one of these data modules."""

from ftlab.data.module import TextClassificationData, TextDataModule

__all__ = ["TextClassificationData", "TextDataModule"]
