"""`python -m ftlab generate`: try a trained model from the command line.

    python -m ftlab generate --run runs/quickstart "a moving, sharp film"       # label and scores
    python -m ftlab generate --run runs/sft                                     # a chat (on a terminal)
    python -m ftlab generate --model runs/sft/export "What is Python?"          # one answer
    echo "John lives in Paris" | python -m ftlab generate --run runs/ner        # entities, a line per input

The model is the run's export (`<run>/export`, or `export/merged` for adapter runs) or any Hugging Face
folder. What it does follows the model's head: a causal LM answers (with the chat template applied: the
tokenizer's, or the run's `data.chat_template`), a seq2seq model generates, a sequence classifier gives
its label and every label's score, a token classifier names the entities (BIO tags), a masked LM fills
each mask. Without a prompt: an interactive chat when stdin is a terminal (history kept, `/reset` starts
over, `/exit` or Ctrl-D quits), else one input per line of stdin and one output line each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ftlab.errors import ConfigError

KINDS = {  # architecture suffix -> what generate does
    "ForCausalLM": "causal-lm",
    "ForConditionalGeneration": "seq2seq",
    "ForSequenceClassification": "classification",
    "ForTokenClassification": "ner",
    "ForMaskedLM": "masked-lm",
}


def model_folder(path: str) -> str:
    """The Hugging Face folder to load for a run directory, an export folder or a model folder."""
    path = os.path.expanduser(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    for sub in ("export/merged", "export", "merged"):
        if os.path.isfile(os.path.join(path, sub, "config.json")):
            return os.path.join(path, sub)
    adapter = next((os.path.join(path, sub) for sub in ("", "export/adapter", "adapter")
                    if os.path.isfile(os.path.join(path, sub, "adapter_config.json"))), None)
    if adapter is not None:
        import json

        with open(os.path.join(adapter, "adapter_config.json")) as f:
            kind = json.load(f).get("peft_type", "")
        if kind in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"):
            raise ConfigError(f"{path!r} holds a {kind.lower().replace('_', ' ')} adapter, which cannot be merged into "
                              f"the weights and which generate does not load; load it with peft: "
                              f"PeftModel.from_pretrained(base_model, {adapter!r})")
        raise ConfigError(f"{path!r} holds an adapter only; give the export's merged/ folder, or export the run "
                          "with `python -m ftlab export --run RUN_DIR` (it merges the adapter)")
    if os.path.isfile(os.path.join(path, "config.yaml")):
        raise ConfigError(f"run {path!r} has no export yet (the run did not finish, or ran with outputs.export false); "
                          f"export its last checkpoint first: python -m ftlab export --run {path}")
    raise ConfigError(f"{path!r}: no model there; give a run directory (runs/NAME) or a model folder (with config.json)")


def run_chat_template(folder: str) -> str | None:
    """The `data.chat_template` of the run an export belongs to (the export's tokenizer may lack one)."""
    import yaml

    for up in (os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
        config = os.path.join(up, "config.yaml")
        if os.path.isfile(config):
            with open(config) as f:
                saved = yaml.safe_load(f) or {}
            template = ((saved.get("data") or {}).get("init_args") or {}).get("chat_template")
            if template and os.path.isfile(os.path.expanduser(template)):
                with open(os.path.expanduser(template), encoding="utf-8") as f:
                    template = f.read()
            elif template and "{" not in template:  # a file path relative to where the run started: not a template
                return None
            return template
    return None


def model_kind(folder: str) -> str:
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    for arch in config.get("architectures") or []:
        for suffix, kind in KINDS.items():
            if arch.endswith(suffix):
                return kind
    raise ConfigError(f"{folder}: architecture {config.get('architectures')} is not one generate knows "
                      f"(a model class ending in {', '.join(KINDS)})")


class Generator:
    """A loaded model and what to do with one input."""

    def __init__(self, folder: str, device: str = "auto", max_new_tokens: int = 256, temperature: float = 0.0,
                 system: str | None = None):
        import torch
        import transformers
        from transformers import AutoTokenizer

        self.folder, self.kind = folder, model_kind(folder)
        auto = {"causal-lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
                "classification": "AutoModelForSequenceClassification", "ner": "AutoModelForTokenClassification",
                "masked-lm": "AutoModelForMaskedLM"}[self.kind]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        from ftlab.loading import check_tokenizer_files

        check_tokenizer_files(folder, "--model")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = getattr(transformers, auto).from_pretrained(folder).to(self.device).eval()
        self.max_new_tokens, self.temperature, self.system = max_new_tokens, temperature, system
        self.chat_template = getattr(self.tokenizer, "chat_template", None) or run_chat_template(folder)
        self.history: list[dict] = []

    def describe(self) -> str:
        extra = {"causal-lm": f"chat template: {'yes' if self.chat_template else 'none, plain continuation'}",
                 "classification": f"labels: {', '.join(self._labels())}",
                 "ner": f"tags: {', '.join(self._labels())}"}.get(self.kind)
        name = type(self.model).__name__
        return f"ftlab generate: {self.folder} ({name}, {self.kind}{'; ' + extra if extra else ''})"

    def _labels(self) -> list[str]:
        id2label = self.model.config.id2label
        return [str(id2label[i]) for i in sorted(id2label)]

    # ---- one input
    def __call__(self, text: str) -> str:
        return {"causal-lm": self.answer, "seq2seq": self.seq2seq, "classification": self.classify,
                "ner": self.entities, "masked-lm": self.fill}[self.kind](text)

    def answer(self, text: str, chat: bool = False, stream=None) -> str:
        import torch

        messages = list(self.history) if chat else []
        if self.system and not messages:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": text})
        prompt = self.render(messages)
        ids = self.tokenizer(prompt, add_special_tokens=not self.chat_template, return_tensors="pt")["input_ids"]
        ids = ids.to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        kwargs = {"do_sample": self.temperature > 0, "max_new_tokens": self.max_new_tokens, "pad_token_id": pad}
        if self.temperature > 0:
            kwargs["temperature"] = self.temperature
        if stream is not None:
            from transformers import TextStreamer

            kwargs["streamer"] = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        reply = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        if chat:
            self.history = messages + [{"role": "assistant", "content": reply}]
        return reply

    def render(self, messages: list[dict]) -> str:
        """The prompt the model sees: the conversation in the chat template, ready for the answer (without a
        template: the last message, continued as plain text)."""
        if not self.chat_template:
            return messages[-1]["content"]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  chat_template=self.chat_template)

    def seq2seq(self, text: str) -> str:
        import torch

        batch = self.tokenizer(text, return_tensors="pt", truncation=True).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0], skip_special_tokens=True).strip()

    def classify(self, text: str) -> str:
        """`label fresh | fresh 0.912 | rotten 0.088`; a tab separates the two texts of a pair."""
        import torch

        first, _, second = text.partition("\t")
        batch = self.tokenizer(first, second or None, return_tensors="pt", truncation=True).to(self.device)
        with torch.no_grad():
            probs = self.model(**batch).logits.float().softmax(-1)[0].tolist()
        labels = self._labels()
        ranked = sorted(zip(labels, probs), key=lambda lp: -lp[1])
        return " | ".join([f"label {ranked[0][0]}", *(f"{label} {p:.3f}" for label, p in ranked)])

    def entities(self, text: str) -> str:
        """`PER: John Smith | LOC: Paris` from the tag of each word's first sub-token (as trained)."""
        import torch

        words = text.split()
        if not words:
            return "(no entities)"
        batch = self.tokenizer(words, is_split_into_words=True, return_tensors="pt", truncation=True)
        word_ids = batch.word_ids(0)
        with torch.no_grad():
            tags = self.model(**batch.to(self.device)).logits[0].argmax(-1).tolist()
        id2label = self.model.config.id2label
        word_tags: dict[int, str] = {}
        for position, word in enumerate(word_ids):
            if word is not None and word not in word_tags:
                word_tags[word] = str(id2label[tags[position]])
        found, current = [], None
        for i, word in enumerate(words):
            tag = word_tags.get(i, "O")
            kind = tag[2:] if tag[:2] in ("B-", "I-") else None
            if kind and (tag.startswith("B-") or current is None or current[0] != kind):
                current = (kind, [word])
                found.append(current)
            elif kind:
                current[1].append(word)
            else:
                current = None
        return " | ".join(f"{kind}: {' '.join(ws)}" for kind, ws in found) or "(no entities)"

    def fill(self, text: str) -> str:
        import torch

        mask = self.tokenizer.mask_token
        if not mask or mask not in text:
            return f"(put {mask} where a word should be filled in)"
        batch = self.tokenizer(text, return_tensors="pt", truncation=True).to(self.device)
        with torch.no_grad():
            logits = self.model(**batch).logits[0]
        spots = (batch["input_ids"][0] == self.tokenizer.mask_token_id).nonzero().flatten().tolist()
        return " | ".join(", ".join(self.tokenizer.decode([t]).strip() for t in logits[s].topk(5).indices.tolist())
                          for s in spots)


def chat(gen: Generator, stdin=None, stdout=None) -> None:
    """The interactive loop (a terminal): a prompt per turn, the answer streamed as it is generated."""
    stdout = stdout or sys.stdout
    print(gen.describe(), file=stdout)
    help_line = "type a message; /reset starts over, /exit or Ctrl-D quits" if gen.kind == "causal-lm" \
        else "type an input; /exit or Ctrl-D quits"
    print(help_line, file=stdout, flush=True)
    try:
        import readline  # noqa: F401 - line editing and history; input() then writes its prompt to stdout
        editing = True
    except ImportError:  # without it, input() writes the prompt to stderr
        editing = False
    prompt = "you> " if gen.kind == "causal-lm" else "> "
    while True:
        try:
            if not editing:
                print(prompt, end="", file=stdout, flush=True)
            text = input(prompt if editing else "")
        except (EOFError, KeyboardInterrupt):
            print(file=stdout)
            return
        text = text.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            gen.history = []
            print("(new conversation)", file=stdout, flush=True)
            continue
        if not text:
            continue
        if gen.kind == "causal-lm":
            print("model> ", end="", file=stdout, flush=True)
            gen.answer(text, chat=True, stream=stdout)  # the streamer prints the answer and a newline
        else:
            print(gen(text), file=stdout, flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ftlab generate", allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Try a trained model: a causal LM answers (chat template applied), a classifier gives its label "
                    "and scores, a token classifier names the entities. Without a prompt: an interactive chat on a "
                    "terminal, else one input per line of stdin.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="a run directory (runs/NAME): its export (export/merged for adapter runs)")
    where.add_argument("--model", help="a model folder (an export, or any Hugging Face folder)")
    p.add_argument("prompt", nargs="*", help="the input (words joined by spaces); none: chat or stdin")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (generating models)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the same answer every time); >0: sample")
    p.add_argument("--system", help="a system message to start the conversation with (causal LMs)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1...; auto: a GPU when there is one")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    folder = model_folder(args.run or args.model)
    gen = Generator(folder, device=args.device, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    system=args.system)
    if args.prompt:
        print(gen(" ".join(args.prompt)), flush=True)
    elif sys.stdin.isatty():
        chat(gen)
    else:
        for line in sys.stdin:
            if line.strip():
                print(gen(line.rstrip("\n")), flush=True)
    return 0
