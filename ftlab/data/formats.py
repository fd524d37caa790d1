"""Row formats of instruction data, by name (`data.format`, or each `data.sources` entry's `format`), and
how each becomes the rows the language-modelling data reads: chat `messages` (lists of `{role, content}`)
or plain `text`.

| format | columns | becomes |
|---|---|---|
| `openai` | `messages`: `[{role, content}]` | the messages (other keys dropped) |
| `sharegpt` | `conversations`: `[{from, value}]` (+ optional `system`) | human -> user, gpt -> assistant, system |
| `alpaca` | `instruction`, `output` (+ optional `input`, `system`) | user: instruction, a blank line, input; assistant: output |
| `prompt_completion` | `prompt`, `completion` (texts, or lists of messages) | user: prompt; assistant: completion |
| `text` | `text` | plain text (continued pretraining) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ftlab.errors import ConfigError, did_you_mean

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system", "tool": "tool"}


@dataclass(frozen=True)
class RowFormat:
    """A named row layout: the columns it needs, the ones it reads when present, and its converter."""

    name: str
    columns: tuple[str, ...]
    optional: tuple[str, ...]
    kind: str  # "chat": becomes `messages`; "text": becomes `text`
    convert: Callable[[dict, str], list[dict] | str]  # (row of the format's columns, where) -> messages or text

    def describe(self) -> str:
        return f"{self.name} [{', '.join(self.columns + tuple(f'({c})' for c in self.optional))}]"


def _text(value, what: str, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts, text only
    raise ConfigError(f"{where}: {what} holds {str(value)[:80]!r}; it must be text")


def _message_list(value, keys: tuple[str, str], roles: dict[str, str] | None, what: str, where: str) -> list[dict]:
    """A list of `{role, content}` (or ShareGPT's `{from, value}`) turns as `{role, content}` messages."""
    role_key, content_key = keys
    if not isinstance(value, list) or not all(isinstance(m, dict) and role_key in m and content_key in m for m in value):
        raise ConfigError(f"{where}: {what} holds {str(value)[:80]!r}; each row must be a list of "
                          f"{{{role_key}, {content_key}}} turns")
    out = []
    for m in value:
        role = str(m[role_key])
        if roles is not None:
            if role.lower() not in roles:
                raise ConfigError(f"{where}: {what} has a turn from {role!r}; known: {sorted(roles)}")
            role = roles[role.lower()]
        out.append({"role": role, "content": _text(m[content_key], f"{what} content", where)})
    return out


def _with_system(system, messages: list[dict], where: str) -> list[dict]:
    system = _text(system, "system", where)
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _openai(row: dict, where: str) -> list[dict]:
    return _message_list(row["messages"], ("role", "content"), None, "messages", where)


def _sharegpt(row: dict, where: str) -> list[dict]:
    turns = _message_list(row["conversations"], ("from", "value"), SHAREGPT_ROLES, "conversations", where)
    return _with_system(row.get("system"), turns, where)


def _alpaca(row: dict, where: str) -> list[dict]:
    # the instruction and its input (the text it acts on) in one user turn, a blank line apart
    prompt = "\n\n".join(p for p in (_text(row["instruction"], "instruction", where),
                                     _text(row.get("input"), "input", where)) if p)
    return _with_system(row.get("system"), [{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": _text(row["output"], "output", where)}], where)


def _side(value, role: str, what: str, where: str) -> list[dict]:
    """A prompt or completion: a text (one turn of `role`) or a list of messages (TRL's conversational form)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _message_list(value, ("role", "content"), None, what, where)
    return [{"role": role, "content": _text(value, what, where)}]


def _prompt_completion(row: dict, where: str) -> list[dict]:
    return _side(row["prompt"], "user", "prompt", where) + _side(row["completion"], "assistant", "completion", where)


FORMATS: dict[str, RowFormat] = {f.name: f for f in (
    RowFormat("openai", ("messages",), (), "chat", _openai),
    RowFormat("sharegpt", ("conversations",), ("system",), "chat", _sharegpt),
    RowFormat("alpaca", ("instruction", "output"), ("input", "system"), "chat", _alpaca),
    RowFormat("prompt_completion", ("prompt", "completion"), (), "chat", _prompt_completion),
    RowFormat("text", ("text",), (), "text", lambda row, where: _text(row["text"], "text", where)),
)}
OUTPUT_COLUMN = {"chat": "messages", "text": "text"}


def check_name(name: str | None, option: str) -> str | None:
    """A format name as given, refused in one line when unknown."""
    if name is not None and name not in FORMATS:
        raise ConfigError(f"{option}={name!r} is not a known row format; {did_you_mean(name, FORMATS)} "
                          f"(formats: {', '.join(FORMATS)})")
    return name


def fitting(columns: list[str], kind: str) -> list[str]:
    """The formats of `kind` ("chat" or "text") whose columns are all among `columns`."""
    return [f.name for f in FORMATS.values() if f.kind == kind and set(f.columns) <= set(columns)]


def described(kind: str | None = None) -> str:
    """The formats and their columns, for error lines: `openai [messages]; alpaca [instruction, output, (input)]`."""
    return "; ".join(f.describe() for f in FORMATS.values() if kind in (None, f.kind))


def suggest(columns: list[str]) -> dict[str, str] | None:
    """A prompt/answer column pair to suggest for rows in no known format (`question`/`answer`...)."""
    def pick(words):
        return next((c for w in words for c in columns if w in c.lower()), None)

    prompt = pick(("prompt", "instruction", "question", "input", "query", "user"))
    answer = pick(("completion", "response", "answer", "output", "assistant", "reply"))
    return {"prompt": prompt, "answer": answer} if prompt and answer and prompt != answer else None


def convert(ds, name: str, where: str, column: str | None = None):
    """Rows of format `name` (a `datasets.Dataset`) -> the format's output (`messages` or `text`) in `column`
    (default: that name); the format's own columns are dropped, other columns kept."""
    import datasets

    fmt = FORMATS[name]
    out = column or OUTPUT_COLUMN[fmt.kind]
    # openai reads `messages` and text `text`, their output's own name: from `column` when that is another
    names = {c: (out if c == OUTPUT_COLUMN[fmt.kind] else c) for c in fmt.columns + fmt.optional}
    missing = [c for c in fmt.columns if names[c] not in ds.column_names]
    if missing:
        raise ConfigError(f"{where}: format {name} needs the columns {[names[c] for c in fmt.columns]}; "
                          f"{[names[c] for c in missing]} not in its columns {ds.column_names} (map yours with "
                          f"columns: {{{missing[0]}: YOURS}} in its data.sources entry)")
    present = {c: n for c, n in names.items() if n in ds.column_names}

    def rows(batch, indices):
        return {out: [fmt.convert({c: batch[n][i] for c, n in present.items()}, f"{where} row {index}")
                      for i, index in enumerate(indices)]}

    # the output's type written out: inferred, it can differ between sources (e.g. as Json), which could
    # then not be concatenated
    features = datasets.Features({k: v for k, v in ds.features.items() if k not in present.values()})
    string = datasets.Value("string")
    features[out] = datasets.List({"role": string, "content": string}) if fmt.kind == "chat" else string
    return ds.map(rows, batched=True, with_indices=True, remove_columns=list(present.values()), features=features,
                  desc=f"reading {name} rows")
