"""A quiet console: what a user must learn to ignore is silenced, ftlab's own facts are kept for the run
header (`ftlab.callbacks.header`), and `--verbose` (or FTLAB_VERBOSE=1) brings everything back.

Silenced unless verbose: Lightning's tips, GPU/TPU banner and other setup chatter, datasets' progress bars
and logs, transformers' weight-loading bar and LOAD REPORT of a new task head (ftlab says once which head
was initialised instead, see `ftlab.loading`), the known deprecation warnings of the pinned libraries, and
everything but errors on ranks other than 0 (their lines repeat rank 0's).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from ftlab.errors import ConfigError

VERBOSE_ENV = "FTLAB_VERBOSE"

# Known warnings of the pinned libraries (requirements/constraints.txt), each harmless for an ftlab run.
KNOWN_WARNINGS: list[tuple[str, str]] = [
    # (message regex, why it is safe to hide)
    (r"The `srun` command is available on your system but is not used",
     "Lightning's hint on a Slurm machine; `ftlab slurm submit` runs the job under srun itself"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning 2.6 calls torch's old pytree API; nothing ftlab can change"),
    (r"`is_gradient_checkpointing` is deprecated",
     "peft calls transformers' old property name; behaviour is the same"),
    (r"LightningCLI's args parameter is intended to run from within Python",
     "ftlab's own entry point passes the command line through `args`"),
    (r"You have overridden `on_before_batch_transfer`",
     "intended: the task, not the data module, transforms batches (e.g. masked-LM masking)"),
    (r"The '(train|val|test|predict)_dataloader' does not have many workers",
     "ftlab sizes data loading itself; rows are pre-tokenised, so workers rarely pay off on CPU"),
    (r"Checkpoint directory .* exists and is not empty",
     "ftlab's run directory holds one run's checkpoints by design"),
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
     "Lightning 2.6's strategy.all_gather calls it (ftlab gathers metrics through it); results are the same"),
]

# Known log lines of the pinned libraries (logger, message regex, why it is safe to hide).
KNOWN_LOG_LINES: list[tuple[str, str, str]] = [
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
     "an optional faster CPU kernel for 4-bit matmuls (the `kernels` package); bitsandbytes falls back to its own"),
]


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(str(record.msg))


# Lightning's INFO lines that repeat what the header says, or advertise.
_LIGHTNING_CHATTER = re.compile(
    r"^(GPU|TPU|HPU|IPU) available|💡 Tip|^Loading `train_dataloader` to estimate|^Seed set to|"
    r"^`Trainer\.(fit|validate|test|predict)` stopped|^LOCAL_RANK: \d+ - |^Initializing distributed|"
    r"All distributed processes registered|^Using .*(Automatic Mixed Precision|precision)|"
    r"^You are using a CUDA device .* Tensor Cores|^Restored all states from the checkpoint|"
    r"^Loaded model weights from the checkpoint|^Missing logger folder|^You defined a `validation_step` but have no `val_dataloader`"
)

# ftlab's own lines whose facts the header prints (kept here for it; printed as they come when verbose).
_FACTS = {
    "data_cache": re.compile(r"^ftlab: tokenised data from cache (?P<path>.+)$"),
    "data_tokenised": re.compile(r"^ftlab: tokenised (?P<sizes>\{.*\}) rows into (?P<path>.+)$"),
    "policy": re.compile(r"^ftlab: policy (?P<name>\S+): training (?P<trainable>[\d,]+) of (?P<total>[\d,]+) "
                         r"parameters \((?P<share>[\d.]+%)\) in: (?P<modules>.*)$"),
}

facts: dict[str, dict | str] = {}  # what the header reads (this process)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched by one)."""
    for name in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return int(os.environ.get("NODE_RANK", "0") or 0) + int(os.environ.get("LOCAL_RANK", "0") or 0)


def note(key: str, value) -> None:
    """A fact for the header (e.g. the new head a model load initialised)."""
    facts[key] = value


class _Quiet(logging.Filter):
    """Drops Lightning's chatter, keeps ftlab's header facts, and drops repeats of any ftlab line."""

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()
        self.verbose = False  # verbose: facts are kept, nothing is dropped

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = record.getMessage()
        if message.startswith("ftlab:"):
            for key, pattern in _FACTS.items():
                match = pattern.match(message)
                if match:
                    facts[key] = match.groupdict()
                    return self.verbose
            if self.verbose:
                return True
            if message in self._seen:
                return False
            self._seen.add(message)
            return True
        return self.verbose or not _LIGHTNING_CHATTER.search(message)


_QUIET = _Quiet()


def setup(verbose: bool | None = None) -> bool:
    """Quiets the console of this process (and, through the environment, of the ranks it launches).
    Returns whether the run is verbose. Call before the libraries log anything."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    verbose = is_verbose()
    if verbose:
        return True
    for pattern, _reason in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, pattern, _reason in KNOWN_LOG_LINES:
        logging.getLogger(name).addFilter(_Drop(pattern))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")  # "Generating train split", cache notes
    if process_rank() > 0:  # other ranks repeat rank 0's lines; their errors still show
        warnings.simplefilter("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return False


def quiet_libraries() -> None:
    """After the libraries are imported: their own progress bars and handlers (verbose: only the header's
    facts are noted, nothing is silenced)."""
    _QUIET.verbose = is_verbose()
    # filters on the handlers see the records of every lightning.* logger
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        if process_rank() > 0 and not _QUIET.verbose:
            logging.getLogger(name).setLevel(logging.ERROR)
        for handler in logging.getLogger(name).handlers:
            if _QUIET not in handler.filters:
                handler.addFilter(_QUIET)
    if _QUIET.verbose:
        return
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import huggingface_hub.utils as hub
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the "Loading weights" bar (it disables the hub's bars too)
        if sys.stderr.isatty():
            hub.enable_progress_bars()  # downloads keep theirs on a terminal: they can take minutes
    except ImportError:
        pass


# --progress.every_n_seconds (set_progress_interval): also the interval of WorkProgress's lines; 0: none
progress_every_s = 30.0


def set_progress_interval(seconds: float, option: str) -> None:
    """Sets the interval of every progress line (loads, exports, tokenising) after checking it: a negative or
    non-finite one would break or flood their timers. `option` names it in the error as the user gave it."""
    global progress_every_s
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{option}={seconds} is not a number of seconds >= 0; give e.g. 30, or 0 for no progress "
                          "lines by time")
    progress_every_s = seconds


class WorkProgress:
    """Plain lines for long work outside the training loop (a sharded load, an export): at a 70B model each
    takes minutes in which nothing else is printed. At most one line every `progress_every_s` seconds, on
    rank 0 (the other ranks do alike), none for work done sooner."""

    def __init__(self, what: str, total: int, unit: str, nbytes: str):
        """
        Args:
            what: What is being done, as the line starts: "export to runs/x/export".
            total: How many units the work has.
            unit: Their name, plural ("blocks", "tensors").
            nbytes: What the bytes counted are: "gathered", "in rank 0's shards".
        """
        self.what, self.total, self.unit, self.nbytes = what, total, unit, nbytes
        self.show = progress_every_s > 0 and _rank_zero()
        self.done, self.bytes = 0, 0
        self.start = self.last = time.monotonic()

    def advance(self, count: int = 1, nbytes: int = 0) -> None:
        self.done += count
        self.bytes += nbytes
        now = time.monotonic()
        if self.show and now - self.last >= progress_every_s:
            self.last = now
            say(f"ftlab: {self.what}: {self.done:,} of {self.total:,} {self.unit}, {size_text(self.bytes)} "
                f"{self.nbytes}, {now - self.start:.0f} s")


@contextmanager
def still_running(what: str) -> Iterator[None]:
    """A line every `progress_every_s` seconds (0.1 s at least) while the work inside runs, on rank 0: for
    long work with nothing to count (a whole from_pretrained: minutes at 70B, its bar silenced); none for
    work done sooner."""
    if progress_every_s <= 0 or not _rank_zero():
        yield
        return
    done, start = threading.Event(), time.monotonic()

    def tick() -> None:
        while not done.wait(max(progress_every_s, 0.1)):
            say(f"ftlab: {what}: {time.monotonic() - start:.0f} s")

    ticker = threading.Thread(target=tick, name="ftlab-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def _rank_zero() -> bool:
    """This process is global rank 0: the process group's word where there is one (ranks that Lightning
    launches itself in an interactive Slurm allocation all inherit SLURM_PROCID 0), else the launcher's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return process_rank() == 0


def say(line: str) -> None:
    """A line on stderr that leaves a progress bar on screen whole (a download's, a verbose run's): tqdm clears
    its bars, writes the line and draws them again."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with transformers and datasets; a bare install prints plainly
        print(line, file=sys.stderr, flush=True)
        return
    tqdm.write(line, file=sys.stderr)


def size_text(nbytes: float) -> str:
    """Bytes as a person reads them: 1.2 GB, 340.5 MB, 12.0 KB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes / 1e3:,.1f} KB"
