"""Sequence-to-sequence data (summarisation, translation, rewriting): a source text and a target text."""

from __future__ import annotations

from ftlab.data.module import TextDataModule
from ftlab.errors import ConfigError


class Seq2SeqData(TextDataModule):
    """Pairs of source and target texts for encoder-decoder models (T5, BART...)."""

    def __init__(
        self,
        source: str | dict[str, str] | None = None,
        source_column: str = "source",
        target_column: str = "target",
        max_target_length: int = 64,
        source_prefix: str = "",
        **kwargs,
    ):
        """
        Args:
            source: See TextDataModule (or give data.sources).
            source_column: Column of the input texts.
            target_column: Column of the texts to generate.
            max_target_length: Truncate targets to this many tokens (also the generation limit at evaluation).
            source_prefix: Text put before every source (T5's task prefixes, e.g. `"summarize: "`).
            **kwargs: The options of TextDataModule (batch_size, max_length for sources, splits, cache...).
        """
        super().__init__(source, **kwargs)
        if max_target_length <= 0:
            raise ConfigError(f"data.max_target_length={max_target_length} must be a positive number of tokens")
        self.source_column, self.target_column = source_column, target_column
        self.max_target_length = max_target_length
        self.source_prefix = source_prefix

    def required_columns(self) -> dict[str, str]:
        return {"source_column": self.source_column, "target_column": self.target_column}

    def text_column_for_dedup(self) -> str | None:
        return self.source_column

    def cache_options(self) -> dict:
        return {**super().cache_options(), "columns": self.required_columns(),
                "max_target_length": self.max_target_length, "source_prefix": self.source_prefix}

    def encode(self, batch: dict) -> dict:
        sources = [self.source_prefix + str(s) for s in batch[self.source_column]]
        enc = self.tokenizer(sources, truncation=True, max_length=self.max_length, **self.token_outputs())
        targets = self.tokenizer(text_target=[str(t) for t in batch[self.target_column]], truncation=True,
                                 max_length=self.max_target_length, **self.token_outputs())
        enc["labels"] = targets["input_ids"]
        return dict(enc)
