"""Token classification data (NER, POS...): rows of words with one tag per word, from CoNLL-style files
or datasets with token/tag list columns. Word tags are aligned to sub-word tokens: the first sub-token
of a word carries its tag, the rest and special tokens are ignored (-100)."""

from __future__ import annotations

from collections import Counter

from ftlab.data.module import TextDataModule, label_names_as_written
from ftlab.errors import ConfigError


class TokenClassificationData(TextDataModule):
    """Words and their tags (BIO/IOB2 for entities)."""

    def __init__(
        self,
        source: str | dict[str, str] | None = None,
        tokens_column: str = "tokens",
        tags_column: str = "tags",
        label_names: list[str | int | float | bool] | None = None,
        **kwargs,
    ):
        """
        Args:
            source: See TextDataModule (or give data.sources); `.conll`/`.iob`/`.bio` files (or
                `source_format: conll`) are read as `token<TAB>tag` lines with a blank line between
                sentences; the named `wnut16-ner` is WNUT-16.
            tokens_column: Column with each row's list of words.
            tags_column: Column with each row's list of tags (names, or ids into the dataset's tag names).
            label_names: The tag set, in id order. Every tag in the data must be one of them. Default:
                the dataset's own names, else the sorted tags seen (`O` first).
            **kwargs: The options of TextDataModule (batch_size, max_length, splits, cache...).
        """
        super().__init__(source, **kwargs)
        self.tokens_column, self.tags_column = tokens_column, tags_column
        self.given_label_names = label_names_as_written(label_names, "tag") or None
        self.label_names = self.given_label_names

    def required_columns(self) -> dict[str, str]:
        return {"tokens_column": self.tokens_column, "tags_column": self.tags_column}

    def cache_options(self) -> dict:
        return {**super().cache_options(), "columns": [self.tokens_column, self.tags_column],
                "label_names": self.given_label_names}

    def prepare_labels(self, raw):
        import datasets

        feature = raw["train"].features[self.tags_column]
        own = getattr(getattr(feature, "feature", None), "names", None)
        counts: Counter = Counter()
        for split, ds in raw.items():
            for i, (words, tags) in enumerate(zip(ds[self.tokens_column], ds[self.tags_column])):
                if not isinstance(words, list) or not isinstance(tags, list):
                    raise ConfigError(f"data: row {i} of {split} has {type(words).__name__}/{type(tags).__name__} in "
                                      f"{self.tokens_column!r}/{self.tags_column!r}; both must be lists (words, tags)")
                if len(words) != len(tags):
                    raise ConfigError(f"data: row {i} of {split} has {len(words)} words but {len(tags)} tags; "
                                      "each word needs exactly one tag")
                counts.update(own[t] if own else str(t) for t in tags)
        seen = sorted(counts, key=lambda t: (t != "O", t))
        names = self.given_label_names or own or seen
        unknown = {t: c for t, c in counts.items() if t not in names}
        if unknown:
            shown = ", ".join(f"{t!r} ({c}x)" for t, c in sorted(unknown.items())[:6])
            raise ConfigError(f"data: tags {shown} in column {self.tags_column!r} are not in data.label_names={names}; "
                              "add them to label_names (or fix the data's tags)")
        for name in names:
            if name != "O" and not name.startswith(("B-", "I-", "E-", "S-", "L-", "U-")):
                raise ConfigError(f"data.label_names: tag {name!r} is neither O nor a B-/I- entity tag; entity "
                                  "metrics need the BIO (IOB2) scheme, e.g. B-person, I-person, O")
        index = {n: i for i, n in enumerate(names)}
        column = self.tags_column
        features = raw["train"].features.copy()
        features[column] = datasets.Sequence(datasets.Value("int64"))
        raw = raw.map(lambda b: {column: [[index[own[t] if own else str(t)] for t in row] for row in b[column]]},
                      batched=True, features=features, desc="tag ids")
        return raw, {"label_names": list(names)}

    def apply_meta(self, meta: dict) -> None:
        self.label_names = meta["label_names"]

    def encode(self, batch: dict) -> dict:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"data.tokenizer={self.tokenizer_name!r} is a slow (Python) tokenizer; aligning word "
                              "tags needs a fast one (word_ids); use the model's tokenizer.json")
        enc = self.tokenizer(batch[self.tokens_column], is_split_into_words=True, truncation=True,
                             max_length=self.max_length, **self.token_outputs())
        labels = []
        for i, tags in enumerate(batch[self.tags_column]):
            previous, row = None, []
            for word in enc.word_ids(i):
                row.append(-100 if word is None or word == previous else tags[word])
                previous = word
            labels.append(row)
        enc["labels"] = labels
        return dict(enc)
