"""Preference pairs: a prompt, a chosen and a rejected response, for preference tuning (`model.task:
Preference`).

Rows are `prompt`/`chosen`/`rejected` text columns, or chosen/rejected conversations (lists of `{role,
content}`) that share everything but their last, assistant, turn (a `prompt` column, if given, goes first).
Both responses are rendered after the prompt with the chat template and labelled on their own tokens only.
One tokenised row holds both sequences of a pair, so a pair never straddles batches or ranks; the collate
stacks each batch's chosen sequences, then its rejected ones. A pair whose prompt alone fills `max_length`
has no response left to score: it is dropped and counted (one line), not truncated into nonsense.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from ftlab.data.collate import PadCollator
from ftlab.data.module import TextDataModule, read_chat_template
from ftlab.errors import ConfigError

SPLIT_ORDER = ("train", "validation", "test")  # pair_index runs through the splits in this order


class PairCollator:
    """A batch of pairs -> 2 x pairs padded sequences (chosen ones first), their labels, and `pair_index`."""

    def __init__(self, pad_token_id: int):
        self.pad = PadCollator(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [{"input_ids": r[f"{side}input_ids"], "labels": r[f"{side}labels"]}
                     for side in ("", "rejected_") for r in rows]
        batch = self.pad(sequences)
        batch["pair_index"] = torch.tensor([r["pair_index"] for r in rows], dtype=torch.long)
        return batch


class PreferenceData(TextDataModule):
    """Preference pairs (prompt, chosen, rejected), rendered with the chat template."""

    def __init__(
        self,
        source: str | dict[str, str] | None = None,
        prompt_column: str | None = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        chat_template: str | None = None,
        **kwargs,
    ):
        """
        Args:
            source: See TextDataModule (or give data.sources).
            prompt_column: Column of prompts: a user message (text) or a conversation so far (list of
                `{role, content}`). None: the chosen and rejected conversations carry the prompt themselves.
            chosen_column: Column of preferred responses: text, or a conversation ending in the assistant's turn.
            rejected_column: Column of dispreferred responses, like chosen_column.
            chat_template: A Jinja chat template (or a path to a file holding one), for tokenizers that have
                none or to replace theirs.
            **kwargs: The options of TextDataModule (batch_size, max_length: per sequence, prompt included,
                splits, cache...).
        """
        super().__init__(source, **kwargs)
        self.prompt_column, self.chosen_column, self.rejected_column = prompt_column, chosen_column, rejected_column
        self.chat_template = read_chat_template(chat_template)
        self.pair_rows = 0
        self._meta_being_written: dict | None = None

    # ---- columns and options
    def required_columns(self) -> dict[str, str]:
        cols = {"chosen_column": self.chosen_column, "rejected_column": self.rejected_column}
        if self.prompt_column:
            cols["prompt_column"] = self.prompt_column
        return cols

    def cache_options(self) -> dict:
        return {**super().cache_options(), "columns": self.required_columns(), "chat_template": self.chat_template}

    # ---- rows -> (prompt messages, chosen text, rejected text)
    def _messages(self, value, what: str) -> list[dict]:
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            return value
        raise ConfigError(f"data.{what}: a row holds {str(value)[:80]!r}; give text or a list of {{role, content}} "
                          "messages")

    def _pair(self, batch: dict, i: int, split: str = "") -> tuple[list[dict], str, str]:
        where = f"row {i}{f' of {split}' if split else ''}"
        chosen, rejected = batch[self.chosen_column][i], batch[self.rejected_column][i]
        prompt = self._messages(batch[self.prompt_column][i], "prompt_column") if self.prompt_column else []
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise ConfigError(f"data: {where}: chosen and rejected must both be text or both conversations")
        if isinstance(chosen, list):
            chosen = self._messages(chosen, "chosen_column")
            rejected = self._messages(rejected, "rejected_column")
            if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
                raise ConfigError(f"data: {where}: chosen and rejected conversations must end with the assistant's turn")
            if chosen[:-1] != rejected[:-1]:
                raise ConfigError(f"data: {where}: the chosen and rejected conversations differ before their last "
                                  "turn; a pair shares its prompt and differs in the last assistant turn only")
            prompt, chosen, rejected = prompt + chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
        if not prompt:
            raise ConfigError(f"data: {where} has no prompt; set data.prompt_column (the column of prompts)")
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"data: {where} has an empty {side} response; fill it or drop the row")
        if chosen.strip() == rejected.strip():
            raise ConfigError(f"data: {where}: chosen and rejected are the same text ({chosen[:60]!r}); a pair "
                              "must differ, drop the row")
        return prompt, chosen, rejected

    # ---- checks before anything is tokenised (and long before the model loads)
    def prepare_labels(self, raw):
        if not (self.chat_template or getattr(self.tokenizer, "chat_template", None)):
            raise ConfigError(f"data: tokenizer {self.tokenizer_name!r} has no chat template to render preference "
                              "pairs; set data.chat_template (a Jinja string or file), or use a chat model's tokenizer")
        for split, ds in raw.items():
            columns = {c: ds[c] for c in self.required_columns().values()}
            for i in range(len(ds)):
                self._pair(columns, i, split)
        # _prepare writes this dict to meta.json after encoding: encode adds its count of dropped pairs to it
        self._meta_being_written = {"dropped_pairs": 0}
        return raw, self._meta_being_written

    # ---- tokens
    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  chat_template=self.chat_template)

    def _sequence(self, prompt: list[dict], prompt_text: str, response: str) -> tuple[list[int], list[int]] | None:
        """Token ids and labels (-100 on the prompt) of prompt + response, or None if the prompt fills max_length."""
        full = self.render(prompt + [{"role": "assistant", "content": response}])
        if not full.startswith(prompt_text):
            raise ConfigError("data.chat_template: the prompt rendered with the generation prompt is not a prefix of "
                              "the prompt and answer rendered together, so the response tokens cannot be located; "
                              "use a template that renders each message in turn")
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, **self.token_outputs())
        in_prompt = sum(1 for start, _ in enc["offset_mapping"] if start < len(prompt_text))
        if in_prompt >= self.max_length - 1:  # not even one response token would be predicted
            return None
        ids = enc["input_ids"][: self.max_length]
        return ids, [-100] * in_prompt + ids[in_prompt:]

    def encode(self, batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "rejected_input_ids": [], "rejected_labels": []}
        for i in range(len(batch[self.chosen_column])):
            prompt, chosen, rejected = self._pair(batch, i)
            prompt_text = self.render(prompt, generation_prompt=True)
            pair = [self._sequence(prompt, prompt_text, text) for text in (chosen, rejected)]
            if None in pair:
                if self._meta_being_written is not None:
                    self._meta_being_written["dropped_pairs"] += 1
                continue
            (c_ids, c_labels), (r_ids, r_labels) = pair
            out["input_ids"].append(c_ids)
            out["labels"].append(c_labels)
            out["rejected_input_ids"].append(r_ids)
            out["rejected_labels"].append(r_labels)
        return out

    # ---- after the cache is read
    def apply_meta(self, meta: dict) -> None:
        dropped = meta.get("dropped_pairs", 0)
        if dropped:
            rank_zero_info(f"ftlab: data: {dropped} pairs dropped: their prompt alone fills data.max_length="
                           f"{self.max_length} tokens (raise max_length or shorten those prompts)")
        empty = [split for split, n in meta.get("sizes", {}).items() if n == 0]
        if empty:
            raise ConfigError(f"data: no pair of the {', '.join(empty)} split fits data.max_length={self.max_length} "
                              "with a response token left; raise max_length")

    def setup(self, stage: str | None = None) -> None:
        fresh = not self.splits
        super().setup(stage)
        if not fresh:
            return
        # A row's number across all splits: precomputed reference log-probs are looked up by it.
        offset = 0
        for split in sorted(self.splits, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER)):
            ds = self.splits[split]
            self.splits[split] = ds.add_column("pair_index", list(range(offset, offset + len(ds))))
            offset += len(ds)
        self.pair_rows = offset

    def collator(self):
        return PairCollator(self.tokenizer.pad_token_id)
