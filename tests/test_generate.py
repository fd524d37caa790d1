"""`python -m ftlab generate` as a terminal program, on real small exports: the run of a classifier
(adapter: export/merged), a token classifier and a chat-tuned causal LM, each trained here by `ftlab fit`."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ftlab.cli import run_cli
from tests.conftest import REPO, fit_args, run_ftlab
from tests.tasks.conftest import CHAT_TEMPLATE, chat_file, ner_file, task_args  # noqa: F401 (fixtures)


class Terminal:
    """`python -m ftlab ...` with stdin and stdout on a pseudo-terminal, as a user at a prompt."""

    def __init__(self, *args: str):
        self.fd, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "ftlab", *args], cwd=REPO, stdin=slave, stdout=slave,
                                     stderr=subprocess.PIPE, env={**os.environ, "TERM": "dumb"}, close_fds=True)
        os.close(slave)
        self.text = ""

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        end = time.time() + timeout
        while True:
            match = re.search(pattern, self.text)
            if match:
                self.text = self.text[match.end():]
                return match
            assert time.time() < end and self.proc.poll() is None, (pattern, self.text, self.proc.stderr.read()
                                                                     if self.proc.poll() is not None else "")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.text += os.read(self.fd, 4096).decode(errors="replace").replace("\r\n", "\n")
                except OSError:
                    pass

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        os.close(self.fd)
        return code


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_bert, reviews_csv) -> Path:
    run = tmp_path_factory.mktemp("gen") / "classifier"
    run_cli(fit_args(run, tiny_bert, reviews_csv, "--trainer.max_epochs=3", policy="Adapter"))
    return run


def test_classifier_label_and_scores_interactive_one_shot_and_stdin(classifier_run):
    term = Terminal("generate", "--run", str(classifier_run))
    term.expect(r"ftlab generate: .*export/merged \(BertForSequenceClassification, classification; labels: neg, pos\)")
    term.expect(r"\n> ")
    term.send("the film is superb and lovely")
    line = term.expect(r"label (\w+) \| (\w+) ([\d.]+) \| (\w+) ([\d.]+)\n")
    # the label is the top score; every label has one (a 3-epoch adapter on a random tiny model: the label
    # itself is not checked)
    assert line.group(1) == line.group(2) and {line.group(2), line.group(4)} == {"pos", "neg"}
    assert float(line.group(3)) >= float(line.group(5))
    assert float(line.group(3)) + float(line.group(5)) == pytest.approx(1, abs=2e-3)
    term.expect(r"> ")
    term.send("/exit")
    assert term.close() == 0

    one = run_ftlab("generate", "--run", str(classifier_run), "awful", "dull", "plot")
    assert one.returncode == 0 and re.fullmatch(r"label (\w+) \| \1 [\d.]+ \| \w+ [\d.]+\n", one.stdout), one
    assert one.stderr == "", one.stderr  # a quiet console
    piped = subprocess.run([sys.executable, "-m", "ftlab", "generate", "--model", str(classifier_run / "export")],
                           input="great film\n\nboring messy plot\n", capture_output=True, text=True, cwd=REPO)
    lines = piped.stdout.splitlines()  # one line per non-empty input line
    assert len(lines) == 2 and all(re.fullmatch(r"label (\w+) \| \1 [\d.]+ \| \w+ [\d.]+", x) for x in lines), piped


def test_ner_names_the_entities(tmp_path, tiny_bert, ner_file):  # noqa: F811
    run = tmp_path / "ner"
    run_cli(task_args(run, tiny_bert, "TokenClassificationData", ner_file, "TokenClassification",
                      "--trainer.max_epochs=4"))
    out = run_ftlab("generate", "--run", str(run), "the film is superb with a dull plot")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "POS: superb | NEG: dull", out.stdout
    assert run_ftlab("generate", "--run", str(run), "the film and the cast").stdout.strip() == "(no entities)"


def test_chat_with_a_causal_lm_applies_the_chat_template_and_keeps_history(tmp_path, tiny_models, chat_file,  # noqa: F811
                                                                            monkeypatch):
    run = tmp_path / "sft"
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    (tmp_path / "model").symlink_to(tiny_models["llama"])
    (tmp_path / "chat.jsonl").symlink_to(chat_file)
    monkeypatch.chdir(tmp_path)  # the model, data and template as paths relative to where the fit starts
    run_cli(task_args(run, Path("model"), "LanguageModelingData", Path("chat.jsonl"), "CausalLM",
                      "--data.chat_template=chat.jinja", "--data.max_length=64", "--data.batch_size=4",
                      "--trainer.max_epochs=6", "--model.task.max_new_tokens=6", "--data.sample_prompts=0",
                      "--test_after_fit=false"))
    monkeypatch.chdir(REPO)
    from ftlab.generate import Generator

    gen = Generator(str(run / "export"), max_new_tokens=6)
    assert gen.chat_template == CHAT_TEMPLATE
    # the export carries the run's template (the base tokenizer has none): a server renders chats as training did
    assert AutoTokenizer.from_pretrained(run / "export").chat_template == CHAT_TEMPLATE
    # the run's config holds the absolute paths: `ftlab export --run` from elsewhere finds them
    config = (run / "config.yaml").read_text()
    for key, name in (("chat_template", "chat.jinja"), ("name_or_path", "model"), ("source", "chat.jsonl")):
        assert f"{key}: {tmp_path / name}\n" in config, key
    out = run_ftlab("export", "--run", str(run), "--out", str(tmp_path / "again"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert AutoTokenizer.from_pretrained(next((tmp_path / "again").glob("**/tokenizer_config.json")).parent
                                         ).chat_template == CHAT_TEMPLATE
    assert gen.render([{"role": "user", "content": "hi"}]) == "user : hi [SEP] assistant : "

    term = Terminal("generate", "--run", str(run), "--max-new-tokens", "6")
    term.expect(r"\(LlamaForCausalLM, causal-lm; chat template: yes\)")
    term.expect(r"you> ")
    term.send("the plot is very lovely sharp")
    answer = term.expect(r"model> ([^\n]*)\n").group(1).split()
    assert answer and all(word in ("lovely", "sharp", "good", "great", "fine", "superb", "brilliant", "moving")
                          for word in answer), answer  # it learned to answer with the question's words
    term.expect(r"you> ")
    term.send("/reset")
    term.expect(r"\(new conversation\)")
    term.expect(r"you> ")
    os.write(term.fd, b"\x04")  # Ctrl-D
    assert term.close() == 0


def test_a_run_without_export_gets_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    out = run_ftlab("generate", "--run", str(tmp_path), "hello")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"ftlab: error: run {str(tmp_path)!r} has no export yet (the run did not finish, or "
                                  "ran with outputs.export false); export its last checkpoint first: "
                                  f"python -m ftlab export --run {tmp_path}")


@pytest.mark.parametrize("peft_type,expected", [
    ("LORA", "holds an adapter only; give the export's merged/ folder, or export the run"),
    ("PREFIX_TUNING", "holds a prefix tuning adapter, which cannot be merged into the weights"),
])
def test_an_adapter_only_export_says_what_to_do(tmp_path, peft_type, expected):
    """A LoRA adapter merges (`ftlab export` writes merged/); a prefix-tuning one never does: exporting again, as the
    LoRA advice says, would not help it."""
    (tmp_path / "export" / "adapter").mkdir(parents=True)
    (tmp_path / "export" / "adapter" / "adapter_config.json").write_text(f'{{"peft_type": "{peft_type}"}}')
    out = run_ftlab("generate", "--run", str(tmp_path), "hello")
    assert out.returncode == 2 and expected in out.stderr, out.stderr[-2000:]
