"""Preparing the tokenised cache: on every core, atomically, and once per job.

Three jobs, for `TextDataModule.prepare_data` and `ftlab prepare`:

- **Who prepares** (`ensure_prepared`): a file lock next to the cache (`<key>.lock`) lets one process prepare;
  the others poll for the finished cache (no torch.distributed collective, so no collective timeout) and
  print who holds the lock. A preparation that fails leaves `<key>.failed` with its error and who failed,
  which the processes waiting on it raise instead of waiting forever; a later run's preparer removes it.
- **On every core** (`encode_splits`): each split is cut into contiguous shards whose bounds are multiples of
  the encode batch (`MAP_BATCH` rows); worker processes encode them into Arrow files. Every encode call
  therefore sees exactly the rows it would see in one process (packing packs within one call), so the
  cache is byte for byte the single-process one. datasets' own `map(num_proc=...)` cuts shards at
  arbitrary rows, which changes what is packed together. Memory stays flat: rows stream from
  memory-mapped Arrow files to Arrow files, 1,000 at a time.
- **Atomically**: everything is written into a temporary folder next to the cache, fsynced, then renamed
  into place; a half-written cache (a killed preparation) is never read, and the next preparer removes it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from ftlab import console
from ftlab.errors import ConfigError

if TYPE_CHECKING:
    from ftlab.data.module import TextDataModule

MAP_BATCH = 1000  # rows per encode call (datasets' default batch, which packing was tuned for)
SHARD_BATCHES = 50  # at most this many batches per shard: more shards than processes balance uneven rows
POLL_S = 1.0
STALE_FAILURE_S = 60.0  # another host's failure this old is an earlier run's (not a node of this job's)
REPORT_EVERY_S = 60.0


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a Slurm task's allocation, not the node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def shard_bounds(rows: int, procs: int, batch: int = MAP_BATCH) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges covering `rows`, each starting at a multiple of `batch`: at least one
    per process where there are enough batches, at most SHARD_BATCHES batches each."""
    batches = math.ceil(rows / batch)
    per = max(1, min(SHARD_BATCHES, math.ceil(batches / max(procs, 1))))
    return [(b * batch, min(rows, (b + per) * batch)) for b in range(0, batches, per)]


# ---- encoding on every core

_WORKER: dict = {}  # the worker's data module, counters and splits (inherited by fork, or unpickled)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Has the kernel SIGKILL this worker when its parent ends: a parent SIGKILLed (the OOM killer, scancel, a
    killed `ftlab prepare`) runs no shutdown, and its workers lived on, orphaned, holding hundreds of MB each
    and never ending. Linux only (prctl); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no prctl in this libc
        return
    # the signal is set only from now on: a parent that died before the call has left us to a new parent
    # (init or a subreaper) already. (It fires when the thread that started the pool ends: ensure_prepared's,
    # which waits for the workers.)
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(payload: dict, parent: int) -> None:
    _die_with_parent(parent)
    # one tokenizer thread per process: the processes are the parallelism (and a fork must not
    # inherit a busy Rust thread pool)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    # a lock of the worker's own for tqdm (datasets' bars, even disabled, take it): a forked worker shares the
    # parent's, and one killed while holding it (the parent stops the others when one dies) left the parent's
    # next progress bar waiting forever
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    _WORKER.update(payload)


def _counters(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if isinstance(v, int) and not isinstance(v, bool)}


def _encode_shard(job: tuple[str, int, int, str]) -> tuple[int, dict]:
    """One shard of one split into an Arrow file. Returns its rows and what it added to meta's counters
    (e.g. preference pairs dropped), which the parent sums over shards."""
    split, start, end, out = job
    dm, meta = _WORKER["dm"], _WORKER["meta"]
    before = _counters(meta)
    ds = _WORKER["splits"][split]
    part = ds.select(range(start, end))
    enc = part.map(dm.encode_with_length, batched=True, batch_size=MAP_BATCH, remove_columns=ds.column_names,
                   cache_file_name=out, load_from_cache_file=False, new_fingerprint=f"{split}-{start}-{end}",
                   writer_batch_size=MAP_BATCH)
    after = _counters(meta)
    return len(enc), {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def _pool_context():
    """fork (cheap: the workers inherit the loaded data and tokenizer) unless CUDA is initialised in this
    process (a GPU job's rank), where a fork may deadlock: spawn then."""
    import multiprocessing

    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    return multiprocessing.get_context("spawn" if cuda else "fork")


def encode_splits(dm: TextDataModule, splits: dict, meta: dict, folder: str, num_proc: int) -> dict[str, list[str]]:
    """Encodes every split into Arrow shards `folder/<split>/shard-NNNNN.arrow` (empty ones left out).
    Returns split -> shard files in row order; adds the shards' counters into `meta`."""
    jobs = []
    for split, ds in splits.items():
        os.makedirs(os.path.join(folder, split), exist_ok=True)
        for start, end in shard_bounds(len(ds), num_proc):
            jobs.append((split, start, end, os.path.join(folder, split, f"shard-{start:012d}.arrow")))
    procs = min(num_proc, len(jobs))
    what = f"tokenising {sum(len(ds) for ds in splits.values()):,} rows in {procs} process" + "es" * (procs > 1)
    results = _run_jobs(dm, splits, meta, jobs, procs, num_proc, what)
    files: dict[str, list[str]] = {split: [] for split in splits}
    for (split, _, _, out), (rows, added) in zip(jobs, results):
        if procs > 1:
            for key, value in added.items():
                meta[key] = meta.get(key, 0) + value
        if rows:
            files[split].append(out)
        else:
            os.remove(out)
    return files


def _run_jobs(dm: TextDataModule, splits: dict, meta: dict, jobs: list, procs: int, num_proc: int, what: str) -> list:
    """Each shard job's (rows, counters added), in job order: in `procs` worker processes, or here; `what`
    printed while they run (console.still_running), its thread started after the workers are forked."""
    # the module without its Trainer (a spawned worker unpickles what it gets); its counters (e.g.
    # PreferenceData's dropped pairs) are `meta` itself, pickled along in one payload
    worker = copy.copy(dm)
    worker.trainer = None
    payload = {"dm": worker, "meta": meta, "splits": splits}
    if procs > 1:
        # an executor, not multiprocessing.Pool: a worker killed outright (the kernel's OOM killer) breaks it
        # and the wait ends; Pool starts a new worker and waits forever for the lost shard
        pool = ProcessPoolExecutor(procs, mp_context=_pool_context(), initializer=_init_worker,
                                   initargs=(payload, os.getpid()))
        try:
            pending = pool.map(_encode_shard, jobs)  # every job submitted: the workers are forked now
            with console.still_running(what):
                results = list(pending)  # in job order: shards stay in row order
        except BrokenProcessPool as err:
            # also raised when a worker cannot start (its payload fails to unpickle): that cause, when there is one
            cause = f" ({str(err.__cause__).strip().splitlines()[-1][:300]})" if err.__cause__ else ""
            raise ConfigError(f"data.num_proc={num_proc}: a worker tokenising the data died abruptly{cause}; killed "
                              f"(out of memory, most often): lower data.num_proc or give the job more host memory") from err
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error, the shards not yet started are dropped
    else:
        _WORKER.update(payload)
        try:
            with console.still_running(what):
                results = [_encode_shard(job) for job in jobs]
        finally:
            _WORKER.clear()
    return results


def load_shards(folder: str, split_files: dict[str, list[str]]):
    """The cache's splits, memory-mapped from their shards (a split whose rows all dropped: an empty dataset)."""
    import datasets

    out = {}
    for split, files in split_files.items():
        parts = [datasets.Dataset.from_file(os.path.join(folder, f)) for f in files]
        out[split] = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else \
            datasets.Dataset.from_dict({"input_ids": [], "length": []})
    return out


# ---- atomic writes

def _fsync_tree(folder: str) -> None:
    for root, _dirs, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_cache(dm: TextDataModule, path: str, num_proc: int) -> dict:
    """Load, check, split and encode into a temporary folder next to `path`, then rename it into place.
    Returns the meta written (sizes, shards, counters)."""
    root, key = os.path.split(path)
    os.makedirs(root, exist_ok=True)
    for stale in os.listdir(root):  # a killed preparation's leftovers (we hold the lock: nobody writes them)
        if stale.startswith(f".tmp-{key}-"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{key}-")
    try:
        splits, meta = dm.load_and_split()
        files = encode_splits(dm, splits, meta, tmp, num_proc)
        meta["num_proc"] = num_proc  # not in the cache key: any number gives these bytes
        meta["shards"] = {split: [os.path.relpath(f, tmp) for f in fs] for split, fs in files.items()}
        meta["sizes"] = {split: len(ds) for split, ds in load_shards(tmp, meta["shards"]).items()}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        _fsync_tree(tmp)
        if os.path.exists(path):  # written meanwhile by a process outside this lock's reach: keep that one
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, path)
            fd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def is_complete(path: str) -> bool:
    """A cache folder exists only once complete (renamed into place with its meta.json)."""
    return os.path.isfile(os.path.join(path, "meta.json"))


# ---- one preparer per job

def _holder(path: str) -> str:
    try:
        with open(path + ".lock.owner") as f:
            who = json.load(f)
        since = time.strftime("%H:%M:%S", time.localtime(who["since"]))
        return f"pid {who['pid']} on {who['host']} ({who['what']}, since {since})"
    except (OSError, ValueError, KeyError):
        return "another process"


def _raise_if_failed(path: str, since: float) -> None:
    """Raise the error a preparer left if it is this wait's: written during it (by a holder this process waited
    on), or shortly before it on another host (maybe a node of this job that failed before this one came:
    retrying would only spend this node's time to fail again). Otherwise it is an earlier run's, which the
    next preparer removes: one left on this host before this wait (a job's processes on one host wait in
    Lightning's barrier or on the lock, so none comes after another failed), e.g. by a run the user fixed
    without changing the cache key (a lower data.num_proc after running out of memory) and reran at once;
    or one older than STALE_FAILURE_S. Without its writer (an older ftlab's file) only its age decides."""
    try:
        written = os.path.getmtime(path + ".failed")
        with open(path + ".failed") as f:
            text = f.read().strip()
    except OSError:
        return
    try:
        failure = json.loads(text)
        error, by = str(failure["error"]), f" (pid {failure['pid']} on {failure['host']})"
        here = failure["host"] == socket.gethostname()
    except (ValueError, KeyError, TypeError):
        error, by, here = text, "", False
    if written < since and (here or written < since - STALE_FAILURE_S):
        return
    raise ConfigError(f"data: preparing the cache {path} failed in another process{by}: {error}")


def ensure_prepared(dm: TextDataModule, may_prepare: bool, who: str, num_proc: int, log=print) -> bool:
    """Returns once `dm.cache_path` is complete. A process that `may_prepare` takes the lock and prepares
    (True returned) unless the cache is complete meanwhile; the others, and those that find the lock held,
    poll, printing who holds it, at first and then every REPORT_EVERY_S."""
    from filelock import FileLock, Timeout

    path = dm.cache_path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = FileLock(path + ".lock")
    reported, since = 0.0, time.time()
    while not is_complete(path):
        if os.path.exists(path + ".failed"):
            # also for a process that may prepare: another node's failure during this wait is the job's failure
            # (retried on every node in turn, it would burn each node's time to fail before the job ends)
            _raise_if_failed(path, since)
        if may_prepare:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                pass
            else:
                try:
                    if is_complete(path):
                        return False
                    if os.path.exists(path + ".failed"):
                        _raise_if_failed(path, since)  # failed between the check above and the lock
                    return _prepare_locked(dm, path, who, num_proc)
                finally:
                    lock.release()
        if time.monotonic() - reported >= REPORT_EVERY_S:
            log(f"ftlab: data: waiting for the cache {path}, being prepared by {_holder(path)}")
            reported = time.monotonic()
        time.sleep(POLL_S)
    return False


def _prepare_locked(dm: TextDataModule, path: str, who: str, num_proc: int) -> bool:
    for leftover in (path + ".failed",):
        if os.path.exists(leftover):
            os.remove(leftover)
    with open(path + ".lock.owner", "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "what": who, "since": time.time()}, f)
    try:
        write_cache(dm, path, num_proc)
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt):
            # who failed, beside what: a waiter tells this host's earlier runs from other nodes' failures
            with open(path + ".failed", "w") as f:
                json.dump({"error": f"{type(err).__name__}: {err}"[:2000], "pid": os.getpid(),
                           "host": socket.gethostname()}, f)
        raise
    finally:
        try:
            os.remove(path + ".lock.owner")
        except OSError:
            pass
    return True


# ---- what `ftlab prepare` prints

def summary(dm: TextDataModule) -> dict:
    """Rows, tokens, and the share of computed tokens that are real, per split, of a prepared cache."""
    from ftlab.data.samplers import GroupedBatchSampler

    out = {"cache": dm.cache_path, "splits": {}}
    packed = getattr(dm, "packing", False) and "position_ids" in dm.splits["train"].column_names
    for split, ds in dm.splits.items():
        lengths = ds.data.column("length").to_numpy()  # an array, not a list of the whole column
        tokens = int(lengths.sum())
        if packed:
            efficiency, how = tokens / max(1, len(lengths) * dm.max_length), "packing"
        else:  # the batches training (or evaluation) draws, each padded to its longest row
            size = dm.batch_size if split == "train" else dm.eval_batch_size
            sampler = GroupedBatchSampler(lengths, size, shuffle=split == "train", group_by_length=dm.group_by_length,
                                          seed=0)
            real = computed = 0
            for batch in sampler:
                part = lengths[batch]
                real, computed = real + int(part.sum()), computed + len(batch) * int(part.max())
            efficiency, how = real / max(1, computed), "padding"
        out["splits"][split] = {"rows": len(ds), "tokens": tokens, "efficiency": efficiency, "of": how}
    return out
