"""Preparing the cache (ftlab/data/prepare.py, `ftlab prepare`): the same bytes from any number of processes,
one preparer at a time (the lock), never a half-written cache, and memory flat in the number of rows."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftlab.data import LanguageModelingData, Seq2SeqData, TextClassificationData, TokenClassificationData
from ftlab.data.preference import PreferenceData
from ftlab.data.prepare import MAP_BATCH, is_complete, shard_bounds
from ftlab.errors import ConfigError
from tests.conftest import FILLER, NEGATIVE, POSITIVE, REPO, children, fit_args, run_ftlab, start_ftlab

ROWS = 2600  # three encode batches: two processes get shards [0, 2000) and [2000, 2600)
TEMPLATE = ("{% for m in messages %}{{ m.role }} {{ m.content }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}")


def _words(rng, n):
    return " ".join(rng.choices(FILLER + POSITIVE + NEGATIVE, k=n))


def _source(kind: str, folder: Path) -> Path:
    rng = random.Random(1)
    if kind == "conll":
        path = folder / "ner.conll"
        with open(path, "w") as f:
            for _ in range(ROWS):
                for word in _words(rng, rng.randint(2, 9)).split():
                    f.write(f"{word}\t{'B-x' if word in POSITIVE else 'O'}\n")
                f.write("\n")
        return path
    path = folder / f"{kind}.jsonl"
    with open(path, "w") as f:
        for i in range(ROWS):
            if kind == "chat":
                row = {"messages": [{"role": "user", "content": _words(rng, rng.randint(1, 8))},
                                    {"role": "assistant", "content": _words(rng, rng.randint(1, 30))}]}
            elif kind == "pairs":
                prompt = _words(rng, rng.randint(1, 40))  # some prompts fill max_length: dropped pairs, counted
                row = {"prompt": prompt, "chosen": _words(rng, 4) + " good", "rejected": _words(rng, 4) + " bad"}
            else:
                row = {"text": _words(rng, rng.randint(2, 60)), "label": rng.choice(["pos", "neg"]),
                       "target": _words(rng, rng.randint(1, 9)), "n": i}
            f.write(json.dumps(row) + "\n")
    return path


FORMATS = {
    "classification": ("plain", lambda src, tok, **kw: TextClassificationData(src, tokenizer=tok, max_length=24, **kw)),
    "token classification": ("conll", lambda src, tok, **kw: TokenClassificationData(src, tokenizer=tok, **kw)),
    "seq2seq": ("plain", lambda src, tok, **kw: Seq2SeqData(src, tokenizer=tok, source_column="text",
                                                            target_column="target", **kw)),
    "causal LM chat, packed": ("chat", lambda src, tok, **kw: LanguageModelingData(
        src, tokenizer=tok, chat_template=TEMPLATE, max_length=48, **kw)),
    "continued pretraining, packed": ("plain", lambda src, tok, **kw: LanguageModelingData(
        src, tokenizer=tok, text_column="text", max_length=16, **kw)),
    "preference pairs": ("pairs", lambda src, tok, **kw: PreferenceData(src, tokenizer=tok, chat_template=TEMPLATE,
                                                                        max_length=32, **kw)),
}


def test_shards_start_at_encode_batches():
    assert shard_bounds(2600, 2) == [(0, 2000), (2000, 2600)]
    assert shard_bounds(999, 4) == [(0, 999)]
    bounds = shard_bounds(123_456, 2)
    assert bounds[0][0] == 0 and bounds[-1][1] == 123_456
    assert all(a % MAP_BATCH == 0 and a == prev for (a, _), (_, prev) in zip(bounds[1:], bounds))


class _KilledInWorker(TextClassificationData):
    """Encodes as usual in the parent; a worker is killed outright (SIGKILL, as the OOM killer does)."""

    def encode(self, batch):
        if os.getpid() != self.parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(batch)


@pytest.mark.parametrize("start", ["fork", "spawn"])  # spawn: a rank that has initialised CUDA
def test_a_killed_worker_fails_the_preparation_instead_of_hanging(tmp_path, tiny_bert, monkeypatch, start):
    import multiprocessing

    from ftlab.data import prepare

    monkeypatch.setattr(prepare, "_pool_context", lambda: multiprocessing.get_context(start))
    dm = _KilledInWorker(str(_source("classification", tmp_path)), tokenizer=str(tiny_bert), val_size=300,
                         test_size=300, num_proc=2, cache_dir=str(tmp_path / "cache"))
    dm.parent = os.getpid()
    with pytest.raises(ConfigError, match=r"data.num_proc=2: a worker tokenising the data died abruptly; killed"):
        dm.prepare_data()
    assert not is_complete(dm.cache_path)
    assert os.path.exists(dm.cache_path + ".failed")  # ranks waiting on this preparation raise it too


FAIL_SCRIPT = """
import os, sys
from tests.data.test_prepare import _KilledInWorker
dm = _KilledInWorker(sys.argv[1], tokenizer=sys.argv[2], val_size=300, test_size=300, num_proc=2, cache_dir=sys.argv[3])
dm.parent = os.getpid()
dm.prepare_data()
"""


def test_a_rerun_right_after_a_failure_prepares(tmp_path, tiny_bert):
    """A run that fails (out of memory with data.num_proc=2), fixed without changing the cache key (a lower
    num_proc) and rerun at once: the rerun prepares. The failure is an earlier run's, not one of a holder the
    rerun waited on (it was refused for 60 s as "failed in another process", with no other process left)."""
    src, cache = str(_source("classification", tmp_path)), str(tmp_path / "cache")
    failed = subprocess.run([sys.executable, "-c", FAIL_SCRIPT, src, str(tiny_bert), cache], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "data.num_proc=2: a worker tokenising the data died" in failed.stderr, \
        failed.stderr[-2000:]
    dm = _KilledInWorker(src, tokenizer=str(tiny_bert), val_size=300, test_size=300, num_proc=1, cache_dir=cache)
    dm.parent = os.getpid()
    assert os.path.exists(dm.cache_path + ".failed")  # the same key
    dm.prepare_data()
    assert is_complete(dm.cache_path) and not os.path.exists(dm.cache_path + ".failed")


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended (its new parent reaps it when it can)


def test_the_workers_end_with_a_killed_preparer(tmp_path, tiny_bert):
    """SIGKILL of the preparing process (the OOM killer, scancel, a killed `ftlab prepare`) ends its tokenising
    workers too: orphaned, they lived on forever, hundreds of MB each."""
    data = _big_csv(tmp_path / "big.csv", 60_000, 12)
    cache = tmp_path / "cache"
    proc = start_ftlab("prepare", *_prepare_args(data, tiny_bert, cache, "--data.num_proc=2"))
    workers: list[int] = []
    end = time.time() + 240
    while len(workers) < 2 or not any(cache.glob(".tmp-*/train/*")):  # both workers started, one tokenising
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < end, f"two workers never tokenised (children: {workers})"
        workers = children(proc.pid)
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the parent alone, no shutdown: its workers are left to themselves
    proc.wait()
    end = time.time() + 10
    while alive := [pid for pid in workers if _running(pid)]:
        assert time.time() < end, f"the workers {alive} outlived their killed parent"
        time.sleep(0.1)


@pytest.mark.parametrize("name", list(FORMATS))
def test_two_processes_write_the_single_process_bytes(name, tmp_path, tiny_bert):
    kind, make = FORMATS[name]
    src = str(_source(kind, tmp_path))
    caches = {}
    for procs in (1, 2):
        dm = make(src, str(tiny_bert), val_size=300, test_size=300, num_proc=procs, cache_dir=str(tmp_path / f"c{procs}"))
        dm.prepare_data()
        dm.setup()
        caches[procs] = dm
    one, two = caches[1], caches[2]
    assert one.cache_path.rsplit("/", 1)[1] == two.cache_path.rsplit("/", 1)[1]  # num_proc is not in the key
    assert two.meta["num_proc"] == 2 and len(two.meta["shards"]["train"]) == 2  # two shards, two processes
    assert one.meta["sizes"] == two.meta["sizes"] and one.meta["sizes"]["train"] > 0
    for split in one.splits:
        a, b = one.splits[split].data.table, two.splits[split].data.table
        assert a.schema == b.schema and a.equals(b), f"{name}: {split} differs between 1 and 2 processes"
    strip = ("num_proc", "shards")
    assert {k: v for k, v in one.meta.items() if k not in strip} == {k: v for k, v in two.meta.items() if k not in strip}
    if name == "preference pairs":  # counted in the workers, summed by the parent
        assert one.meta["dropped_pairs"] == two.meta["dropped_pairs"] > 0


def _config_args(run_dir: Path, tiny_bert: Path, data: Path, *extra: str) -> list[str]:
    return fit_args(run_dir, tiny_bert, data, "--trainer.max_epochs=1", *extra)[1:]  # without "fit"


def test_prepare_then_fit_tokenises_nothing(tmp_path, tiny_bert, reviews_csv):
    cache = tmp_path / "cache"
    args = _config_args(tmp_path / "run", tiny_bert, reviews_csv, f"--data.cache_dir={cache}")
    out = run_ftlab("prepare", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    (key,) = [p for p in cache.iterdir() if p.is_dir()]
    assert f"ftlab prepare: {key} (prepared in" in out.stdout
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert lines["train"][1] == "160" and int(lines["train"][2].replace(",", "")) > 160  # rows, tokens
    assert {"train", "validation", "test"} <= set(lines) and "(padding)" in out.stdout
    stamp = (key / "meta.json").stat().st_mtime_ns
    again = run_ftlab("prepare", *args)
    assert "(already there: nothing tokenised)" in again.stdout
    fit = run_ftlab("fit", *args)
    assert fit.returncode == 0, fit.stderr[-2000:]
    # fit read the very cache prepare wrote: the same key, not rewritten, and no other
    assert [p for p in cache.iterdir() if p.is_dir()] == [key] and (key / "meta.json").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 10  # 160 rows / 16


def _big_csv(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = FILLER + POSITIVE + NEGATIVE
    with open(path, "w") as f:
        f.write("text,label\n")
        for i in range(rows):
            f.write(f"{' '.join(rng.choices(vocab, k=words))} {i},{rng.choice(('pos', 'neg'))}\n")
    return path


def _prepare_args(data: Path, tiny_bert: Path, cache: Path, *extra: str) -> list[str]:
    return _config_args(Path("runs/unused"), tiny_bert, data, f"--data.cache_dir={cache}", "--data.max_length=16",
                        *extra)


def test_a_killed_preparation_is_never_read(tmp_path, tiny_bert):
    data = _big_csv(tmp_path / "big.csv", 60_000, 12)
    cache = tmp_path / "cache"
    args = _prepare_args(data, tiny_bert, cache, "--data.num_proc=2")
    proc = subprocess.Popen([sys.executable, "-m", "ftlab", "prepare", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.time() + 240
    while not any(cache.glob(".tmp-*/train/*")):  # some shard is being written
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < end, "no shard was ever written"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")] == []
    assert any(cache.glob(".tmp-*"))  # the half-written folder, under its temporary name
    out = run_ftlab("prepare", *args, "--progress.every_n_seconds=0.1", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (key,) = [p for p in cache.iterdir() if p.is_dir()]  # complete, and the leftovers are gone
    meta = json.loads((key / "meta.json").read_text())
    assert sum(meta["sizes"].values()) == 60_000 and "prepared in" in out.stdout
    # the config's progress interval holds for `prepare` too: lines while the workers tokenise (none at 30 s)
    assert re.search(r"ftlab: tokenising [\d,]+ rows in 2 processes: \d+ s", out.stderr), out.stderr[-2000:]


def test_one_preparer_at_a_time_and_the_others_say_who(tmp_path, tiny_bert, reviews_csv):
    """While another process holds the cache's lock, `ftlab prepare` waits, naming it, then prepares."""
    from filelock import FileLock

    from ftlab.cli import parse_fit_config

    cache = tmp_path / "cache"
    args = _prepare_args(reviews_csv, tiny_bert, cache)
    path = parse_fit_config(args).datamodule.cache_path  # the key the subprocess will use
    with FileLock(path + ".lock"):
        Path(path + ".lock.owner").write_text(json.dumps({"pid": os.getpid(), "host": "the-test-host",
                                                          "what": "the test", "since": time.time()}))
        proc = subprocess.Popen([sys.executable, "-m", "ftlab", "prepare", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = ""
        while "waiting for the cache" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "prepare ended without waiting"
        assert f"pid {os.getpid()} on the-test-host (the test" in line and path in line
        time.sleep(2)
        assert proc.poll() is None and not is_complete(path)  # still waiting, nothing written meanwhile
        os.remove(path + ".lock.owner")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "prepared in" in out and is_complete(path)


MEMORY_SCRIPT = """
import json, sys, threading, time
from pathlib import Path
from ftlab.cli import parse_fit_config

def anon():
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])

dm = parse_fit_config(sys.argv[1:]).datamodule
dm.tokenizer
base = anon()
peak = [base]
stop = threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.02)
t = threading.Thread(target=watch); t.start()
dm.prepare_data()
stop.set(); t.join()
print(json.dumps({"base_kb": base, "peak_kb": peak[0], "sizes": dm.meta.get("sizes") or json.load(open(dm.cache_path + "/meta.json"))["sizes"]}))
"""


def _growth_kb(tmp_path: Path, tiny_bert: Path, rows: int) -> tuple[int, int]:
    """(data file kB, peak anonymous memory added by preparing it, kB), in a fresh process."""
    data = _big_csv(tmp_path / f"rows-{rows}.csv", rows, 45)
    args = _prepare_args(data, tiny_bert, tmp_path / f"cache-{rows}", "--data.num_proc=1")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert sum(result["sizes"].values()) == rows
    return data.stat().st_size // 1024, result["peak_kb"] - result["base_kb"]


def test_memory_stays_flat_in_the_number_of_rows(tmp_path, tiny_bert):
    """Six times the rows, the same memory: rows stream from file to file, none are held, so a file larger
    than the node's RAM prepares too. (The fixed cost, about 60 MB here, is datasets' and pyarrow's own.)"""
    small_kb, small_grew = _growth_kb(tmp_path, tiny_bert, 15_000)
    large_kb, large_grew = _growth_kb(tmp_path, tiny_bert, 90_000)
    assert large_kb - small_kb > 15_000  # 15+ MB more data
    assert large_grew - small_grew < (large_kb - small_kb) / 5, (small_kb, small_grew, large_kb, large_grew)
    assert large_grew < 200_000


def test_ranks_wait_for_the_cache_longer_than_the_collective_timeout(tmp_path, tiny_bert, reviews_csv):
    """A 2-rank fit whose cache another process is preparing: the ranks wait (rank 0 polls the lock, rank 1
    waits in Lightning's barrier without a deadline) past --collective_timeout, then train on the cache."""
    from filelock import FileLock

    from ftlab.cli import parse_fit_config

    args = fit_args(tmp_path / "run", tiny_bert, reviews_csv, "--trainer.max_epochs=1", "--trainer.strategy=ddp",
                    "--trainer.devices=2", "--collective_timeout=60", "--data.cache_shared=true",
                    f"--data.cache_dir={tmp_path / 'cache'}", "--test_after_fit=false")
    path = parse_fit_config(args[1:]).datamodule.cache_path
    with FileLock(path + ".lock"):
        Path(path + ".lock.owner").write_text(json.dumps({"pid": os.getpid(), "host": "the-test-host",
                                                          "what": "the test", "since": time.time()}))
        proc = subprocess.Popen([sys.executable, "-m", "ftlab", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        lines = [""]
        while "waiting for the cache" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1] or proc.poll() is None, "fit ended without waiting: " + "".join(lines)[-3000:]
        time.sleep(65)  # longer than the collective timeout (which also bounds the start-up: not shorter)
        assert proc.poll() is None
        os.remove(path + ".lock.owner")
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (2, 5)  # 160 rows / (16 per rank x 2 ranks)
    assert is_complete(path)


def recording_write(calls: list):
    """Stands for the tokenisation (write_cache): records the preparation and leaves a complete cache."""
    def write(dm, path, num_proc):
        calls.append(path)
        os.makedirs(path)
        Path(path, "meta.json").write_text("{}")
    return write


def test_a_failure_during_the_wait_ends_every_process_even_those_that_may_prepare(tmp_path, monkeypatch):
    """Node-local preparers on a shared cache: once one has failed, the next must not take the lock and fail
    again in turn (each node's time to fail, on GPU nodes); an old failure (an earlier run's) is retried."""
    from types import SimpleNamespace

    from ftlab.data.prepare import STALE_FAILURE_S, ensure_prepared
    from ftlab.errors import ConfigError

    dm = SimpleNamespace(cache_path=str(tmp_path / "cache" / "key"))
    os.makedirs(tmp_path / "cache")
    failed = Path(dm.cache_path + ".failed")
    failed.write_text("ValueError: row 7 has no text")
    with pytest.raises(ConfigError, match="failed in another process: ValueError: row 7 has no text"):
        ensure_prepared(dm, may_prepare=True, who="rank 8", num_proc=1, log=lambda *_: None)
    old = time.time() - STALE_FAILURE_S - 10
    os.utime(failed, (old, old))
    calls = []
    monkeypatch.setattr("ftlab.data.prepare.write_cache", recording_write(calls))  # the retry runs, not stopped
    assert ensure_prepared(dm, may_prepare=True, who="rank 0", num_proc=1, log=lambda *_: None)
    assert calls == [dm.cache_path] and not failed.exists()


def test_who_failed_decides_whether_a_failure_before_the_wait_is_an_earlier_runs(tmp_path, monkeypatch):
    """A failure left just before this wait: another host's may be this job's other node (raised, the writer
    named); this host's is an earlier run's (the next preparer removes it and prepares)."""
    from types import SimpleNamespace

    from ftlab.data.prepare import ensure_prepared

    dm = SimpleNamespace(cache_path=str(tmp_path / "cache" / "key"))
    os.makedirs(tmp_path / "cache")
    failed = Path(dm.cache_path + ".failed")
    failure = {"error": "ValueError: row 7 has no text", "pid": 4242, "host": "another-node"}
    failed.write_text(json.dumps(failure))
    with pytest.raises(ConfigError, match=r"failed in another process \(pid 4242 on another-node\): ValueError: row 7"):
        ensure_prepared(dm, may_prepare=True, who="rank 8", num_proc=1, log=lambda *_: None)
    failed.write_text(json.dumps({**failure, "host": socket.gethostname()}))
    calls = []
    monkeypatch.setattr("ftlab.data.prepare.write_cache", recording_write(calls))
    assert ensure_prepared(dm, may_prepare=True, who="rank 0", num_proc=1, log=lambda *_: None)
    assert calls == [dm.cache_path] and not failed.exists()


def test_a_holder_on_this_host_failing_during_the_wait_ends_it(tmp_path, monkeypatch):
    """This host's failure written while a process waited on its holder is the waiter's too: it raises, it does
    not take the lock to fail again in turn."""
    import threading
    from types import SimpleNamespace

    from ftlab.data import prepare

    monkeypatch.setattr(prepare, "POLL_S", 0.05)
    started, fail = threading.Event(), threading.Event()

    def write(dm, path, num_proc):  # the holder's preparation, failing once the waiter waits
        started.set()
        fail.wait(30)
        raise ValueError("row 7 has no text")

    monkeypatch.setattr(prepare, "write_cache", write)
    dm = SimpleNamespace(cache_path=str(tmp_path / "cache" / "key"))
    raised = []

    def hold():
        with pytest.raises(ValueError) as err:
            prepare.ensure_prepared(dm, may_prepare=True, who="the holder", num_proc=1, log=lambda *_: None)
        raised.append(err.value)

    holder = threading.Thread(target=hold)
    holder.start()
    assert started.wait(30)
    by = rf"\(pid {os.getpid()} on {re.escape(socket.gethostname())}\)"
    with pytest.raises(ConfigError, match=rf"failed in another process {by}: ValueError: row 7 has no text"):
        # the holder fails once the waiter has found the lock held and says so
        prepare.ensure_prepared(dm, may_prepare=True, who="a waiter", num_proc=1, log=lambda *_: fail.set())
    holder.join(30)
    assert raised and fail.is_set()
