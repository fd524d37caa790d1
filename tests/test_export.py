"""Streamed export: sharded safetensors written a block at a time, as save_pretrained would write them; the
adapter merged layer by layer as merge_and_unload merges it; a 2-rank FSDP fit and `ftlab export` of its
sharded checkpoint (which reads the model's entries only, and writes no full copy anywhere)."""

import copy
import json
import re
import tempfile

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

from ftlab.callbacks import RunOutputs
from ftlab.errors import ConfigError
from ftlab.export import DcpReader, export_streamed, local_gather, state_blocks
from ftlab.export_cli import build_from_run, export_run, meta_model_and_pretrained
from ftlab.policies import Adapter
from ftlab.tasks import SequenceClassification
from tests.conftest import nudge_trainable, run_ftlab
from tests.test_strategies import distributed_fit

IDS = torch.tensor([[2, 7, 9, 30, 3], [2, 15, 20, 3, 0]])
MASK = (IDS != 0).long()


def read_folder(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a from_pretrained folder, sharded or not."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


def saved_keys(model, tmp_path) -> set[str]:
    """The tensor names transformers' own save_pretrained writes for `model`."""
    model.save_pretrained(tmp_path / "reference", max_shard_size="20KB")
    return set(json.loads((tmp_path / "reference" / "model.safetensors.index.json").read_text())["weight_map"])


# tied weights: GPT-2's lm_head is its token embedding; BERT's MLM decoder shares weight and bias
@pytest.mark.parametrize("auto_class,kind", [(AutoModelForCausalLM, "gpt2"), (AutoModelForMaskedLM, "bert")])
def test_streamed_export_shards_like_save_pretrained_and_reloads(tmp_path, tiny_models, auto_class, kind):
    model = auto_class.from_pretrained(tiny_models[kind]).eval()
    assert len({p.data_ptr() for p in model.parameters()}) < len(dict(model.named_parameters(remove_duplicate=False)))
    out = tmp_path / "export"
    assert export_streamed(model, local_gather, str(out), max_shard_size="20KB") == {"model": str(out)}

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards == sorted(set(index["weight_map"].values()))
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert max((out / s).stat().st_size for s in shards) < 20_000 + 4_096  # a tensor's bytes plus a header
    assert not list(out.glob("*.tmp")) and not list(tmp_path.glob(".export.tmp-*"))
    assert set(index["weight_map"]) == saved_keys(model, tmp_path)
    assert index["metadata"]["total_parameters"] == model.num_parameters()
    assert (out / "config.json").exists() and (out / "generation_config.json").exists() == model.can_generate()

    reloaded = auto_class.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS, attention_mask=MASK).logits,
                                   model(input_ids=IDS, attention_mask=MASK).logits, rtol=0, atol=0)


def test_one_shard_is_model_safetensors_without_index(tmp_path, tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    export_streamed(model, local_gather, str(tmp_path / "export"))  # default: 5GB shards
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    assert read_folder(tmp_path / "export").keys() == saved_keys(model, tmp_path)


@pytest.mark.parametrize("size", ["lots", "0", 0, "5 parsecs"])
def test_a_bad_shard_size_is_refused_up_front(size):
    with pytest.raises(ConfigError, match=r"outputs.max_shard_size=.* is not a size; give bytes .* like '5GB'"):
        RunOutputs(max_shard_size=size)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_adapter_merged_layer_by_layer_equals_merge_and_unload(tmp_path, tiny_models, method):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=2)
    model = Adapter(method=method, r=4).apply(base, SequenceClassification())
    nudge_trainable(model)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=IDS, attention_mask=MASK).logits
    folders = export_streamed(model, local_gather, str(tmp_path / "export"), max_shard_size="20KB")

    reference = tmp_path / "reference"
    copy.deepcopy(model).merge_and_unload().save_pretrained(reference / "merged")
    model.save_pretrained(reference / "adapter")
    merged, expected = read_folder(tmp_path / "export" / "merged"), read_folder(reference / "merged")
    assert merged.keys() == expected.keys()
    assert not any("lora_" in k or "base_layer" in k or "modules_to_save" in k for k in merged)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "export" / "merged" / "config.json").read_text()) == \
        json.loads((reference / "merged" / "config.json").read_text())
    adapter, expected = (load_file(f / "adapter" / "adapter_model.safetensors") for f in (tmp_path / "export", reference))
    assert adapter.keys() == expected.keys() and all(torch.equal(adapter[k], expected[k]) for k in expected)
    assert set(folders) == {"adapter", "merged"}

    with torch.no_grad():  # merged on copies: the live model is untouched
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("kind,targets", [
    ("bert", None),  # masked LM on a plain encoder: the new MLM head (its decoder tied to the embeddings) trains a copy
    ("gpt2", ["c_attn", "lm_head"]),  # LoRA on a tied LM head
    ("gpt2", ["c_attn", "wte"]),  # LoRA on a tied embedding: the head keeps the embedding's unadapted weight
])
def test_a_merged_export_of_an_adapted_tied_weight_unties_it_and_reloads_as_trained(tmp_path, tiny_models, kind,
                                                                                  targets):
    """Once merged, a tied pair of which an adapter changed one side is two tensors: the export writes both and
    says the weights are untied (from_pretrained would tie them again). It crashed (KeyError) before."""
    from ftlab.tasks import CausalLM, DomainAdaptation

    auto_class, task = (AutoModelForMaskedLM, DomainAdaptation()) if kind == "bert" else (AutoModelForCausalLM,
                                                                                            CausalLM())
    torch.manual_seed(0)
    model = Adapter(method="lora", r=4, target_modules=targets).apply(auto_class.from_pretrained(tiny_models[kind]),
                                                                      task)
    nudge_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=MASK).logits
    export_streamed(model, local_gather, str(tmp_path / "export"))
    merged = auto_class.from_pretrained(tmp_path / "export" / "merged").eval()
    assert merged.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS, attention_mask=MASK).logits, expected, rtol=0, atol=1e-5)


def test_an_adapter_export_is_swapped_in_whole_and_cleans_up_after_a_crash(tmp_path, tiny_models, monkeypatch):
    """adapter/ and merged/ come from one export (a failed merge or --no-merge-adapter left the older merged/ beside
    the new adapter/, and generate served it); what a crash left (temp folders, a folder moved aside) is dealt
    with; the folders are as readable as a plain mkdir makes them; a --out holding other files is refused."""
    import os

    import ftlab.export
    from ftlab.export_cli import check_out

    model = Adapter(method="lora", r=4).apply(
        AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=2), SequenceClassification())
    out = tmp_path / "export"
    export_streamed(model, local_gather, str(out))
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    nudge_trainable(model)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(ftlab.export, "_export_merged", disk_full)
        with pytest.raises(OSError):
            export_streamed(model, local_gather, str(out))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter  # the earlier export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp folder left

    # a crash between the two renames of the swap (export moved aside), and a killed export's temp folder
    out.rename(tmp_path / "export.old")
    (tmp_path / ".export.tmp-killed").mkdir()
    export_streamed(model, local_gather, str(out), merge_adapter=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]  # no merged/ of the earlier export beside it
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != adapter
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask

    # a failure on the writing rank (here: its temp folder) still takes part in every gather, in the order the
    # other ranks gather (they would wait in the next collective until the timeout), then fails
    def counting(seen):
        def gather(blocks):
            for block, state in local_gather(blocks):
                seen.append(block.prefix)
                yield block, state
        return gather

    everything, partial = [], []
    export_streamed(model, counting(everything), str(tmp_path / "again"))
    for broken in ("_atomic_dir", "_save_model_files"):
        partial.clear()
        with monkeypatch.context() as patch:
            patch.setattr(ftlab.export, broken, disk_full)
            with pytest.raises(OSError):
                export_streamed(model, counting(partial), str(tmp_path / "again"))
        assert partial == everything, broken

    check_out(str(out))  # an export: replaced
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        check_out(str(tmp_path / "models"))


@pytest.fixture(scope="module")
def fsdp_adapter_run(tmp_path_factory, tiny_models, reviews_csv):
    """A 2-rank FSDP LoRA fit whose export streams into 20KB shards."""
    return distributed_fit(tmp_path_factory, tiny_models["llama"], reviews_csv, "fsdp", "Adapter",
                           "--outputs.max_shard_size=20KB", "--progress.every_n_seconds=1e-9")


def test_fsdp_fit_streams_a_sharded_export_that_reloads(fsdp_adapter_run, tiny_models):
    export = fsdp_adapter_run["dir"] / "export"
    assert len(list((export / "merged").glob("model-*-of-*.safetensors"))) >= 3
    assert (export / "merged" / "model.safetensors.index.json").exists()
    assert fsdp_adapter_run["summary"]["export"] == {"adapter": str(export / "adapter"), "merged": str(export / "merged")}
    # how far the export is, as it goes (every line due: the interval is 1 ns), on rank 0 only, to the last block
    lines = re.findall(r"ftlab: export to (\S+): (\d+) of (\d+) blocks, ([\d.]+) ([KMG]B) gathered, \d+ s", fsdp_adapter_run["stderr"])
    assert lines and {folder for folder, *_ in lines} == {str(export / "merged")}, lines[:3]
    assert [int(done) for _, done, *_ in lines] == list(range(1, int(lines[0][2]) + 1)), lines
    merged = AutoModelForSequenceClassification.from_pretrained(export / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=2)
    adapter = PeftModel.from_pretrained(base, export / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS, attention_mask=MASK).logits,
                                   adapter(input_ids=IDS, attention_mask=MASK).logits, rtol=1e-5, atol=1e-5)


class CountingReader(FileSystemReader):
    """torch's own checkpoint reader, noting what each load reads from the files."""

    def __init__(self, path):
        super().__init__(path)
        self.read_keys: set[str] = set()
        self.read_bytes = 0

    def read_data(self, plan, planner):
        for item in plan.items:
            self.read_keys.add(item.storage_index.fqn)
            self.read_bytes += self.storage_data[item.storage_index].length
        return super().read_data(plan, planner)


def test_export_of_an_fsdp_checkpoint_reads_only_the_model(fsdp_adapter_run, tiny_models, tmp_path):
    ckpt = fsdp_adapter_run["dir"] / "checkpoints" / "last.ckpt"
    module, data = build_from_run(str(fsdp_adapter_run["dir"]))
    data.setup("fit")
    model, pretrained = meta_model_and_pretrained(module, data)
    reader = CountingReader(str(ckpt))
    tensors = {}
    for _, state in DcpReader(str(ckpt), batch_bytes=20_000, storage_reader=reader, pretrained=pretrained)(
            state_blocks(model)):
        tensors.update(state)

    saved = reader.read_metadata().state_dict_metadata
    model_keys = {k for k in saved if k.startswith("state_dict.model.")}
    assert any(k.startswith("optimizer") for k in saved)  # there was an optimizer state not to read
    assert reader.read_keys == model_keys
    stored = {index.fqn: 0 for index in reader.storage_data}
    for index, item in reader.storage_data.items():
        stored[index.fqn] += item.length
    assert reader.read_bytes == sum(n for k, n in stored.items() if k in model_keys) < sum(stored.values())
    # the checkpoint holds what trained; the frozen base comes from the pretrained files, as they are
    saved_names = {k.removeprefix("state_dict.model.") for k in model_keys}
    frozen = module.frozen_pretrained(model)
    assert saved_names == set(model.state_dict()) - frozen
    assert any(n.endswith("q_proj.base_layer.weight") for n in frozen)
    assert tensors.keys() == {e[0] for block in state_blocks(model) for e in block.entries}
    base = read_folder(tiny_models["llama"])
    for name in frozen - {n for n in frozen if ".original_module." in n}:  # peft's untrained head: zeros, unused
        key = name.removeprefix("base_model.model.model.").replace(".base_layer.", ".")  # saved as a bare LlamaModel
        assert torch.equal(tensors[name], base[key]), name


def test_export_command_streams_an_fsdp_checkpoint_without_a_temp_copy(fsdp_adapter_run, tmp_path, monkeypatch):
    run = fsdp_adapter_run["dir"]
    out = run_ftlab("export", f"--run={run}", f"--out={tmp_path / 'cli'}", "--max-shard-size=30KB",
                    "--progress-every-n-seconds=1e-9")
    assert out.returncode == 0, out.stderr[-3000:]
    # the command's own interval: a line for every block (at the default 30 s this export prints none)
    lines = re.findall(r"ftlab: export to \S+: (\d+) of (\d+) blocks", out.stderr)
    assert lines and [int(done) for done, _ in lines] == list(range(1, int(lines[0][1]) + 1)), out.stderr[-2000:]
    for kind in ("merged", "adapter"):
        at_fit_end = read_folder(run / "export" / "merged") if kind == "merged" else \
            load_file(run / "export" / "adapter" / "adapter_model.safetensors")
        fresh = read_folder(tmp_path / "cli" / "merged") if kind == "merged" else \
            load_file(tmp_path / "cli" / "adapter" / "adapter_model.safetensors")
        assert fresh.keys() == at_fit_end.keys()
        for name, tensor in at_fit_end.items():
            torch.testing.assert_close(fresh[name], tensor, rtol=0, atol=1e-6)
    assert len(list((tmp_path / "cli" / "merged").glob("model-*.safetensors"))) >= 2

    # no temporary file anywhere: a full copy of the checkpoint (dcp_to_torch_save) would need one
    not_a_dir = tmp_path / "no-temp-files-here"
    not_a_dir.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_dir))
    folders = export_run(str(run), out=str(tmp_path / "in-process"))
    assert folders == {"adapter": str(tmp_path / "in-process" / "adapter"), "merged": str(tmp_path / "in-process" / "merged")}
    assert read_folder(tmp_path / "in-process" / "merged").keys() == read_folder(run / "export" / "merged").keys()
