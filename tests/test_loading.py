"""Hub models on several ranks: local rank 0 of a node downloads the files once (FineTuneModule.prepare_data)
while the node's other ranks wait; their from_pretrained then reads the Hugging Face cache. Checked against a
small fake hub on 127.0.0.1 that serves a tiny model under the endpoints huggingface_hub calls."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.conftest import fit_args, run_ftlab

REPO_ID = "org/tiny-bert"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """One model repository at one commit, served as the hub serves it: repository info and file tree (JSON),
    and each file by `resolve` (HEAD: the commit, ETag and size; GET: the bytes). Unknown paths are 404s the way
    the hub says a file is missing. Every request is logged as (method, path, user agent)."""

    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.log: list[tuple[str, str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.log.append((handler.command, path, handler.headers.get("User-Agent", "")))
        api = f"/api/models/{self.repo_id}"
        resolve = re.fullmatch(rf"/{re.escape(self.repo_id)}/resolve/[^/]+/(.+)", path)
        if path == api or path.startswith(f"{api}/revision/"):
            info = {"id": self.repo_id, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": name} for name in self.files]}
            self.send(handler, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        elif path in (f"{api}/tree/{COMMIT}", f"{api}/tree/main"):
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in self.files.items()]
            self.send(handler, 200, json.dumps(tree).encode(), body, {"Content-Type": "application/json"})
        elif resolve and resolve.group(1) in self.files:
            data = self.files[resolve.group(1)]
            self.send(handler, 200, data, body, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
        else:
            self.send(handler, 404, b'{"error": "Entry not found"}', body, {"X-Error-Code": "EntryNotFound"})

    @staticmethod
    def send(handler, status: int, data: bytes, body: bool, headers: dict) -> None:
        handler.send_response(status)
        for key, value in {"Content-Length": str(len(data)), "X-Repo-Commit": COMMIT, **headers}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests(self, method: str, file: str) -> list[str]:
        """User agents of the `method` requests for one file of the repository."""
        pattern = re.compile(rf"/{re.escape(self.repo_id)}/resolve/[^/]+/{re.escape(file)}")
        return [agent for m, path, agent in self.log if m == method and pattern.fullmatch(path)]


def test_each_node_downloads_hub_weights_once_for_all_its_ranks(tmp_path, tiny_bert, reviews_csv):
    with FakeHub(REPO_ID, tiny_bert) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        run = tmp_path / "run"
        out = run_ftlab(*fit_args(run, REPO_ID, reviews_csv, "--trainer.strategy=ddp", "--trainer.devices=2",
                                  "--trainer.max_epochs=1"), env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert "model.safetensors" in hub.files
    for name in hub.files:
        assert len(hub.requests("GET", name)) <= 1, (name, hub.log)
    # the weights came down once, from prepare_data (ftlab's download), before any rank's from_pretrained
    [agent] = hub.requests("GET", "model.safetensors")
    assert agent.startswith("ftlab/"), agent


def test_a_hub_model_in_the_cache_as_prepare_data_fetches_it_is_found(tmp_path, tiny_models, monkeypatch):
    """prepare_data fetches only what from_pretrained reads. Once huggingface_hub has cached the repository's
    file list, snapshot_download(local_files_only) refuses such a snapshot (no README...), and every hub model
    looked absent: FSDP and ZeRO-3 fell back to whole loads on every rank, checkpoints kept the frozen base."""
    import hashlib
    import os

    from huggingface_hub import constants
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    from ftlab.checkpoints import base_files
    from ftlab.estimate.memory import read_checkpoint
    from ftlab.loading import PretrainedWeights

    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hub" / "models--ftlab-test--tiny-llama"
    snapshot, entries = storage / "snapshots" / commit, {}
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir()
    for source in sorted(tiny_models["llama"].iterdir()):
        data = source.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / sha).write_bytes(data)
        os.symlink(f"../../blobs/{sha}", snapshot / source.name)
        entries[source.name] = TreeCacheEntry(size=len(data), blob_id=sha[:40], lfs_sha256=sha, lfs_size=len(data))
    entries["README.md"] = TreeCacheEntry(size=10, blob_id="f" * 40)  # in the repository, never fetched
    write_tree_cache(str(storage), commit, entries)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    weights = PretrainedWeights.find("ftlab-test/tiny-llama", None, None, "model")
    assert weights is not None and weights.key("model.norm.weight") == "norm.weight"
    assert read_checkpoint("ftlab-test/tiny-llama").folder == str(snapshot)
    found = base_files("ftlab-test/tiny-llama")
    sha = hashlib.sha256((tiny_models["llama"] / "model.safetensors").read_bytes()).hexdigest()
    assert found == {"files": {"model.safetensors": sha}, "commit": commit}  # by content, the weights alone
