"""Language-modelling data: chat `messages`, prompt/response pairs, or plain text; for supervised
fine-tuning (SFT) of decoders and for domain-adaptive (continued) pretraining.

Chat rows are rendered with the tokenizer's chat template (or `chat_template`); by default only the
assistant's tokens are trained. Training rows are packed into `max_length` blocks; each example keeps
its own position ids from 0, from which transformers builds a block-diagonal causal mask: no token
attends across examples (the batch then has no attention_mask, by design).
"""

from __future__ import annotations

import bisect

from lightning.pytorch.utilities import rank_zero_info

from ftlab.data import formats
from ftlab.data.module import TextDataModule, read_chat_template
from ftlab.errors import ConfigError


class LanguageModelingData(TextDataModule):
    """Text for a language-model objective: chat messages, prompt/response, or raw text."""

    def __init__(
        self,
        source: str | dict[str, str] | None = None,
        messages_column: str | None = "messages",
        prompt_column: str | None = None,
        response_column: str | None = None,
        text_column: str | None = None,
        chat_template: str | None = None,
        train_on_prompt: bool = False,
        packing: bool = True,
        sample_prompts: int = 3,
        **kwargs,
    ):
        """
        Args:
            source: See TextDataModule; the named `chatterbot-english` is the chatterbot-corpus Q/A set. Rows
                in a known format (data.format: openai, sharegpt, alpaca, prompt_completion; found from the
                columns when not given) become chat messages; `format: text` reads plain text.
            messages_column: Column of chat conversations: lists of `{role, content}` (roles user, assistant,
                system). Used unless a prompt/response or text column is given.
            prompt_column: Column of prompts (with response_column: one user turn, one assistant turn).
            response_column: Column of responses to the prompts.
            text_column: Column of plain text (continued pretraining): every token trains, long texts are
                cut into max_length pieces.
            chat_template: A Jinja chat template (or a path to a file holding one), for tokenizers that have
                none or to replace theirs.
            train_on_prompt: Also train on system/user tokens (default: the assistant's tokens only).
            packing: Pack several examples into each max_length row (no padding, no cross-example
                attention). Off: one example per row, padded to the batch's longest.
            sample_prompts: Held-out prompts whose greedy answers are logged at each validation (0 = none).
            **kwargs: The options of TextDataModule (batch_size, max_length, splits, cache...).
        """
        super().__init__(source, **kwargs)
        if prompt_column and not response_column or response_column and not prompt_column:
            raise ConfigError("data.prompt_column and data.response_column go together; set both (or use messages)")
        if text_column and prompt_column:
            raise ConfigError("data.text_column and data.prompt_column exclude each other; set one")
        if sample_prompts < 0:
            raise ConfigError(f"data.sample_prompts={sample_prompts} must be >= 0")
        kinds = {formats.FORMATS[f].kind for f in self.source.formats if f}
        if kinds and (prompt_column or text_column):
            raise ConfigError(f"data.{'prompt' if prompt_column else 'text'}_column reads one source's own columns; with "
                              "a row format (data.format) map columns in its data.sources entry (columns: {...}) instead")
        if len(kinds) > 1:
            raise ConfigError(f"data.sources: formats {[f for f in self.source.formats if f]} mix chat rows and plain "
                              "text; one run trains on one kind (text: continued pretraining)")
        if kinds == {"text"}:
            text_column = "text"
        self.mode = "text" if text_column else "pair" if prompt_column else "messages"
        self.messages_column = messages_column or "messages"
        self.prompt_column, self.response_column, self.text_column = prompt_column, response_column, text_column
        self.chat_template = read_chat_template(chat_template)
        self.train_on_prompt = train_on_prompt
        self.packing = packing
        self.sample_prompts = sample_prompts
        self.samples: list[dict] = []

    # ---- columns and options
    def required_columns(self) -> dict[str, str]:
        if self.mode == "text":
            return {"text_column": self.text_column}
        if self.mode == "pair":
            return {"prompt_column": self.prompt_column, "response_column": self.response_column}
        return {"messages_column": self.messages_column}

    def missing_column_hint(self, option: str, columns: list[str]) -> str | None:
        if option != "messages_column":
            return None
        guess = formats.suggest(columns)
        mapping = (f"columns: {{prompt: {guess['prompt']}, completion: {guess['answer']}}}" if guess
                   else "columns: {FORMAT_COLUMN: YOURS}")
        options = (f"for a prompt/response file set data.prompt_column and data.response_column (--data.prompt_column "
                   f"{guess['prompt']} --data.response_column {guess['answer']})" if guess else
                   "set data.messages_column to the column of chat messages, data.prompt_column and "
                   "data.response_column for prompt/response pairs")
        return (f"{options}, or data.text_column for plain text; or give the rows' format, in data.format or a "
                f"data.sources entry, with {mapping} to map yours: {formats.described('chat')}")

    def row_formats(self) -> tuple[str, ...]:
        return tuple(formats.FORMATS)

    def normalise_rows(self, ds, format: str | None, split: str, where: str):
        """Rows in a known format -> `messages` (chat) or `text`; rows with the messages (or text) column as
        they are, checked; otherwise the format their columns fit (one), else one line naming the columns
        found and the formats."""
        if self.mode == "pair":
            return ds, None
        kind, column = ("text", self.text_column) if self.mode == "text" else ("chat", self.messages_column)
        if format is None:
            if column in ds.column_names:
                format = "text" if kind == "text" else "openai"
            else:
                fits = formats.fitting(ds.column_names, kind)
                if len(fits) != 1:
                    option = "text_column" if kind == "text" else "messages_column"
                    raise ConfigError(
                        f"{where}: the {split} data's columns {ds.column_names} fit the formats {fits}; set the format "
                        "(data.format, or format: in its data.sources entry)" if fits else
                        f"{where}: column {column!r} is not in the {split} data; its columns are {ds.column_names}; "
                        f"{self.missing_column_hint(option, ds.column_names) or formats.described(kind)}")
                format = fits[0]
                rank_zero_info(f"ftlab: {where} rows read as {formats.FORMATS[format].describe()}")
        return formats.convert(ds, format, where, column=column), format

    def text_column_for_dedup(self) -> str | None:
        return self.text_column

    def cache_options(self) -> dict:
        return {**super().cache_options(), "mode": self.mode, "columns": self.required_columns(),
                "chat_template": self.chat_template, "train_on_prompt": self.train_on_prompt,
                "packing": self.packing, "sample_prompts": self.sample_prompts}

    def check_chat_template(self) -> None:
        if self.mode != "text" and not (self.chat_template or getattr(self.tokenizer, "chat_template", None)):
            raise ConfigError(f"data: tokenizer {self.tokenizer_name!r} has no chat template to render "
                              f"{self.mode} rows; set data.chat_template (a Jinja string or file), or use a chat "
                              "model's tokenizer")

    # ---- rows -> messages -> tokens
    def _messages(self, batch: dict, i: int) -> list[dict]:
        if self.mode == "pair":
            return [{"role": "user", "content": str(batch[self.prompt_column][i])},
                    {"role": "assistant", "content": str(batch[self.response_column][i])}]
        messages = batch[self.messages_column][i]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise ConfigError(f"data.messages_column={self.messages_column!r}: a row holds {str(messages)[:80]!r}; "
                              "each row must be a list of {role, content} messages")
        return messages

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  chat_template=self.chat_template)

    def _chat_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """One conversation's text and the character spans that train (the assistant's turns, by default)."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" and not self.train_on_prompt:
                continue
            before = self.render(messages[:i], generation_prompt=message["role"] == "assistant") if i else ""
            upto = self.render(messages[: i + 1]) if i < len(messages) - 1 else full
            if not (full.startswith(upto) and upto.startswith(before)):
                raise ConfigError("data.chat_template: rendering the first k messages does not give a prefix of "
                                  "the whole conversation, so the assistant's tokens cannot be located; use a "
                                  "template that renders each message in turn")
            spans.append((len(before), len(upto)))
        return full, spans

    def _chat_examples(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels of conversations (one tokenizer call for all): labels are -100 outside the
        trained spans."""
        texts, all_spans = zip(*(self._chat_spans(m) for m in conversations)) if conversations else ((), ())
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                             max_length=self.max_length, **self.token_outputs())
        examples = []
        for ids, offsets, spans in zip(enc["input_ids"], enc["offset_mapping"], all_spans):
            starts = [start for start, _ in offsets]  # ascending: a span's tokens are one slice
            labels = [-100] * len(ids)
            for a, b in spans:
                first, end = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
                labels[first:end] = ids[first:end]
            examples.append((ids, labels))
        return examples

    def _text_examples(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        examples = []
        for ids in self.tokenizer(texts, **self.token_outputs())["input_ids"]:
            examples += [(ids[k:k + self.max_length], ids[k:k + self.max_length])
                         for k in range(0, len(ids), self.max_length)]
        return examples

    def encode(self, batch: dict) -> dict:
        rows = len(next(iter(batch.values())))
        if self.mode == "text":
            examples = self._text_examples([str(t) for t in batch[self.text_column]])
        else:
            examples = self._chat_examples([self._messages(batch, i) for i in range(rows)])
        # an example with nothing to learn (e.g. its answer was truncated away) would give a 0/0 loss
        examples = [(ids, labels) for ids, labels in examples if any(x != -100 for x in labels[1:])]
        if self.packing:
            return self._pack(examples)
        return {"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]}

    def _pack(self, examples) -> dict:
        """First-fit decreasing bin packing of the examples into max_length rows (within each batch of 1,000
        rows (prepare.MAP_BATCH; the parallel shards are cut at its multiples, so packing is the same for any
        data.num_proc): longest first, each into the first row with room.
        Greedy in-order packing wasted 13-22% of each row on the real data (benchmarks/padding.py)."""
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
            n = len(examples[i][0])
            slot = next((r for r, left in enumerate(room) if left >= n), None)
            if slot is None:
                rows.append([])
                room.append(self.max_length)
                slot = len(rows) - 1
            rows[slot].append(i)
            room[slot] -= n
        out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for members in rows:
            ids, labels, positions = [], [], []
            for i in members:
                ex_ids, ex_labels = examples[i]
                ids += ex_ids
                labels += [-100] + ex_labels[1:]  # an example's first token is not predicted from the last one's
                positions += list(range(len(ex_ids)))
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["position_ids"].append(positions)
        return out

    # ---- held-out prompts for sample generations
    def prepare_labels(self, raw):
        if self.mode != "text":
            self.check_chat_template()  # before any tokenising, let alone a model load
        return raw, {}

    def split_meta(self, splits: dict) -> dict:
        samples = []
        if self.mode != "text" and "validation" in splits:
            rows = splits["validation"][: self.sample_prompts]
            for i in range(min(self.sample_prompts, len(splits["validation"]))):
                messages = self._messages(rows, i)
                last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=0)
                if last:
                    samples.append({"messages": messages[:last], "reference": messages[last]["content"]})
        return {"samples": samples}

    def apply_meta(self, meta: dict) -> None:
        self.samples = meta.get("samples", [])
