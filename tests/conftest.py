"""Shared fixtures: a small labelled text file and tiny models saved to disk, loaded by the tests
through the same `from_pretrained` path a user's hub id or folder takes."""

from __future__ import annotations

import contextlib
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


_RAN: set[str] = set()


def pytest_runtest_logreport(report):
    """A failure named the moment it happens, with its cause's first line: a CI run stopped at its time
    limit never reaches pytest's closing summary, and its log showed only a row of F's."""
    if "PYTEST_XDIST_WORKER" in os.environ:  # the controller reports for both workers
        return
    if report.when == "call" or not report.passed:
        _RAN.add(report.nodeid)
    if report.failed and not hasattr(report, "wasxfail"):
        crash = getattr(report.longrepr, "reprcrash", None)
        cause = crash.message.splitlines()[0][:200] if crash is not None and crash.message else ""
        print(f"\nFAILED {report.nodeid} ({report.when}, {report.duration:.0f} s): {cause}", file=sys.stderr,
              flush=True)


def pytest_sessionfinish(session, exitstatus):
    """A run that stopped before every test ran (xdist stops after too many crashed workers, exiting 1 as for
    failed tests) exits 2, as an interrupted one: `make test` reruns the failures of a whole run only."""
    if "PYTEST_XDIST_WORKER" in os.environ or exitstatus != pytest.ExitCode.TESTS_FAILED:
        return
    if len(_RAN) < session.testscollected:
        print(f"\n{session.testscollected - len(_RAN)} of {session.testscollected} tests never ran",
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.INTERRUPTED


POSITIVE = ["good", "great", "fine", "superb", "lovely", "brilliant", "moving", "sharp"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "messy", "tired", "flat"]
FILLER = ["the", "film", "is", "a", "story", "with", "cast", "plot", "and", "very", "quite", "its", "of", "this"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Short 'reviews' whose label follows from their sentiment words (learnable in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=rng.randint(3, 12)) + rng.choices(POSITIVE if label == "pos" else NEGATIVE, k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label, "topic": rng.choice(["film", "book"])})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", make_rows(240))


def _tokenizer(save_dir: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]")
    fast.save_pretrained(save_dir)
    return fast


# Dropout off: runs under different strategies are then comparable step by step.
TINY = {
    "bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0),
    "llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0),
}


def build_tiny(kind: str, save_dir: Path) -> Path:
    """A randomly initialised tiny backbone plus tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    tok = _tokenizer(save_dir)
    spec = dict(TINY[kind])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, **spec)
    AutoModel.from_config(config).save_pretrained(save_dir)
    return save_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: build_tiny(kind, root / f"tiny-{kind}") for kind in TINY}


@pytest.fixture(scope="session")
def tiny_bert(tiny_models) -> Path:
    return tiny_models["bert"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Each test session (each xdist worker) gets its own tokenisation cache, never the user's ~/.cache nor
    CI's: session-scoped, so that module-scoped fixtures' runs use it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "ftlab-cache"))
        yield


def fit_args(run_dir: Path, model: Path, data: Path, *extra: str, policy: str = "Full") -> list[str]:
    """Arguments of a small but real `ftlab fit` on the given model and csv."""
    return [
        "fit",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.max_epochs=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--model.name_or_path={model}",
        f"--model.policy={policy}",
        "--model.optim.lr=0.01",
        "--data=TextClassificationData",
        f"--data.source={data}",
        "--data.batch_size=16",
        "--data.val_size=40",
        "--data.test_size=40",
        *extra,
    ]


def run_ftlab(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """`python -m ftlab ...` in a subprocess, as a user runs it. If it times out, or the test ends first (its
    pytest timeout), the whole job is killed, its other ranks included."""
    proc = tracked(subprocess.Popen([sys.executable, "-m", "ftlab", *args], cwd=cwd or REPO,
                                     env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True))
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_ftlab(*args: str) -> subprocess.Popen:
    """`python -m ftlab ...` started in its own process group (to kill the whole job at once)."""
    return tracked(subprocess.Popen([sys.executable, "-m", "ftlab", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True))


_JOBS: list[subprocess.Popen] = []


def tracked(proc: subprocess.Popen) -> subprocess.Popen:
    """A job started by a test, killed whole when the test ends (start it in a session of its own)."""
    _JOBS.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test():
    """Jobs a test started are killed whole when it ends, however it ends (a timeout, a failed wait): a job left
    running took the cores from every later test. A DeepSpeed job killed while it built its CPU op leaves the
    build lock behind, which would stop every later DeepSpeed job: removed once no process holds it."""
    yield
    killed = False
    while _JOBS:
        proc = _JOBS.pop()
        with contextlib.suppress(ProcessLookupError):  # the group's processes may all have ended
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        proc.communicate()
    if killed:
        from ftlab.strategies.deepspeed import stale_build_lock

        lock = stale_build_lock(min_age_s=0)
        if lock is not None:
            os.remove(lock)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the running job has written `path`."""
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """Child processes (the ranks Lightning's launcher started from rank 0)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def nudge_trainable(model) -> None:
    """Move every trainable weight away from its init, as training would (LoRA's B starts at 0, so an
    untrained adapter merges to nothing and hides a wrong merge)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def saved_weights(ckpt) -> set[str]:
    """The model tensors a checkpoint holds (any kind: Lightning file, FSDP sharded folder, DeepSpeed folder);
    for DeepSpeed ZeRO-2/3 also every frozen weight's fragments it holds beside the module state."""
    import torch

    if ckpt.is_file():
        return set(torch.load(ckpt, weights_only=True, mmap=True)["state_dict"])
    if (ckpt / ".metadata").exists():
        from torch.distributed.checkpoint import FileSystemReader

        return {k.removeprefix("state_dict.") for k in FileSystemReader(ckpt).read_metadata().state_dict_metadata
                if k.startswith("state_dict.")}
    names = set()
    for states in (ckpt / "checkpoint").glob("*model_states.pt"):
        state = torch.load(states, weights_only=False)
        names |= {k.removeprefix("_forward_module.") for k in state["module"]}
        names |= {f"frozen fragment {k}" for k in state.get("frozen_param_fragments") or {}}
    return names


def assert_only_trained_weights(ckpt, policy):
    """Frozen weights (a LoRA run's base model) are not in the checkpoint; the trained ones are."""
    names = saved_weights(ckpt)
    if policy == "Adapter":
        assert not [n for n in names if "base_layer" in n or "frozen fragment" in n], sorted(names)[:10]
        assert [n for n in names if "lora_A" in n], sorted(names)[:10]
    else:
        assert [n for n in names if "layers.0." in n or "layer.0." in n], sorted(names)[:10]
