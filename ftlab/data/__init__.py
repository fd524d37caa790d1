"""Data: sources, tokenisation cache, batching. `data` in a config takes one of these data modules."""

from ftlab.data.lm import LanguageModelingData
from ftlab.data.module import TextClassificationData, TextDataModule
from ftlab.data.preference import PreferenceData
from ftlab.data.seq2seq import Seq2SeqData
from ftlab.data.tokens import TokenClassificationData

__all__ = ["LanguageModelingData", "PreferenceData", "Seq2SeqData", "TextClassificationData", "TextDataModule", "TokenClassificationData"]
