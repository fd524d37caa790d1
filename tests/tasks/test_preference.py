"""Preference tuning: each loss against a hand computation, the three reference variants give the same loss,
real runs (DPO raises reward accuracy; precomputed reference = frozen copy; 2-rank FSDP, ZeRO-3 and DDP with
the reference precomputed = one process, batch by batch; a precomputed table on 2 sharded ranks covers a split
with fewer rows than ranks; a run resumed mid-epoch ends like the uninterrupted one; LoRA with the adapter-off
reference exports a merged model plain transformers loads)."""

import json
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ftlab.cli import run_cli
from ftlab.errors import ConfigError
from ftlab.tasks import Preference
from ftlab.tasks.distillation import FrozenTeacher
from ftlab.tasks.preference_losses import LOSSES, PairLogps, sequence_logps
from ftlab.tasks.preference_reference import AdapterOff, FrozenCopy, Precomputed, rank_batches
from tests.conftest import run_ftlab
from tests.tasks.conftest import CHAT_TEMPLATE, task_args

# two pairs: summed log-probs of the trained model and of the reference, and response lengths
POLICY = PairLogps(torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -5.0]), torch.tensor([2, 3]), torch.tensor([3, 2]))
REF = PairLogps(torch.tensor([-5.0, -8.0]), torch.tensor([-5.5, -6.0]), torch.tensor([2, 3]), torch.tensor([3, 2]))


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _hand(loss: str, beta: float, ls: float = 0.0, gamma: float = 0.5) -> list[tuple[float, float, float]]:
    """(loss, chosen reward, rejected reward) of each pair, from the papers' formulas, in plain floats."""
    out = []
    for i in range(2):
        c, r, rc, rr = POLICY.chosen[i].item(), POLICY.rejected[i].item(), REF.chosen[i].item(), REF.rejected[i].item()
        nc, nr = POLICY.chosen_tokens[i].item(), POLICY.rejected_tokens[i].item()
        if loss in ("dpo", "hinge"):
            z = beta * ((c - rc) - (r - rr))
            value = (-(1 - ls) * math.log(_sig(z)) - ls * math.log(_sig(-z))) if loss == "dpo" else max(0.0, 1 - z)
            out.append((value, beta * (c - rc), beta * (r - rr)))
        elif loss == "ipo":
            h = (c / nc - rc / nc) - (r / nr - rr / nr)
            out.append(((h - 1 / (2 * beta)) ** 2, beta * (c - rc) / nc, beta * (r - rr) / nr))
        elif loss == "simpo":
            z = beta * (c / nc) - beta * (r / nr) - gamma
            out.append((-(1 - ls) * math.log(_sig(z)) - ls * math.log(_sig(-z)), beta * c / nc, beta * r / nr))
        else:  # orpo
            pc, pr = math.exp(c / nc), math.exp(r / nr)
            log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
            out.append((-c / nc - beta * math.log(_sig(log_odds)), beta * c / nc, beta * r / nr))
    return out


@pytest.mark.parametrize("loss,beta,ls", [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                          ("hinge", 0.3, 0.0), ("simpo", 2.0, 0.0), ("simpo", 2.5, 0.1),
                                          ("orpo", 0.1, 0.0)])
def test_each_loss_matches_a_hand_computation(loss, beta, ls):
    result = LOSSES[loss](POLICY, REF if loss in ("dpo", "ipo", "hinge") else None, beta=beta, gamma=0.5,
                          label_smoothing=ls)
    for i, (value, chosen, rejected) in enumerate(_hand(loss, beta, ls)):
        assert result.losses[i].item() == pytest.approx(value, rel=1e-6)
        assert result.chosen_rewards[i].item() == pytest.approx(chosen, rel=1e-6)
        assert result.rejected_rewards[i].item() == pytest.approx(rejected, rel=1e-6)


def test_sequence_logps_sums_the_labelled_tokens_after_the_shift():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1]])  # tokens 2 and 3 are scored, from positions 1 and 2
    total, count = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    assert count.item() == 2 and total.item() == pytest.approx((logp[0, 1, 3] + logp[0, 2, 1]).item(), rel=1e-6)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="'dpp' is not a preference loss; did you mean 'dpo'"):
        Preference(loss="dpp")
    with pytest.raises(ConfigError, match="uses no reference model"):
        Preference(loss="simpo", precompute_reference=True)
    assert Preference(loss="simpo").beta == 2.0 and Preference().beta == 0.1


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory, tiny_models):
    """The tiny Llama with its LM head saved: a frozen reference loaded from it equals the trained model's start."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama-lm"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(folder)
    return folder


def test_adapter_off_frozen_copy_and_precomputed_references_give_the_same_loss(tmp_path, tiny_causal, pairs_file):
    from peft import LoraConfig, get_peft_model

    from ftlab.data import PreferenceData

    data = PreferenceData(str(pairs_file), tokenizer=str(tiny_causal), chat_template=CHAT_TEMPLATE, max_length=32,
                          val_size=8, test_size=8, cache_dir=str(tmp_path / "cache"))
    data.setup()
    rows = [{k: v for k, v in data.splits["train"][i].items() if k != "length"} for i in range(6)]
    batch = data.collator()(rows)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_causal),
                            LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0))
    torch.manual_seed(1)
    with torch.no_grad():  # the trained model moves away from the reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    task = Preference(loss="dpo", beta=0.5)
    task.reference = AdapterOff()
    adapter_off = task.forward(policy, batch)
    frozen = FrozenCopy(FrozenTeacher(AutoModelForCausalLM.from_pretrained(tiny_causal)))
    task.reference = frozen
    frozen_copy = task.forward(policy, batch)
    # precomputed: the frozen model's log-probs stored by pair_index, as compute_table stores them
    ref = frozen.pair_logps(policy, batch)
    table = torch.full((data.pair_rows, 2), float("nan"), dtype=torch.float64)
    table[batch["pair_index"]] = torch.stack([ref.chosen, ref.rejected], 1).double()
    task.reference = Precomputed()
    task.reference.table = table
    precomputed = task.forward(policy, batch)
    assert abs(adapter_off["loss"].item() - math.log(2)) > 1e-3  # the rewards are not all zero
    for other in (frozen_copy, precomputed):
        assert other["loss"].item() == pytest.approx(adapter_off["loss"].item(), rel=1e-6)
        assert torch.allclose(other["chosen_rewards"], adapter_off["chosen_rewards"], atol=1e-6)


# ---- real runs, shared by the tests below
class BatchLosses(L.Callback):
    """Added to the test runs (`--trainer.callbacks+=tests.tasks.test_preference.BatchLosses`): each rank writes
    `<folder>/rank<r>.json`: the loss of every training batch it ran, with the step and the pairs of the batch,
    and how many of the reference model's parameters it holds (a sharded reference holds its share)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.batches: list[dict] = []
        self.reference: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        params = list(pl_module.reference.parameters()) if hasattr(pl_module, "reference") else []
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else  # ZeRO-3: this rank's partition
                   p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)  # FSDP: shard
        self.reference = {"held": held, "total": sum(getattr(p, "ds_numel", p.numel()) for p in params)}
        if params:  # the trained model's attention kernel (set in the tests below: eager)
            self.reference["attn"] = pl_module.reference.model.config._attn_implementation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # the step this batch belongs to (it moves on after the last micro-batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands on the loss divided by the accumulation (its share of the step's gradient)
        loss = float(outputs["loss"]) * trainer.accumulate_grad_batches
        self.batches.append({"step": self._step, "epoch": trainer.current_epoch,
                             "pairs": batch["pair_index"].tolist(), "loss": loss})

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"batches": self.batches, "reference": self.reference}, f)


def probe(folder: Path) -> list[str]:
    return ["--trainer.callbacks+=tests.tasks.test_preference.BatchLosses", f"--trainer.callbacks.folder={folder}"]


def batches(folder: Path) -> dict[tuple, dict]:
    """(epoch, pairs) -> step and loss of every training batch the ranks ran."""
    out = {}
    for path in sorted(folder.glob("rank*.json")):
        for b in json.loads(path.read_text())["batches"]:
            out[(b["epoch"], tuple(b["pairs"]))] = b
    return out


ARGS = ("--data.max_length=32", "--data.batch_size=4", "--data.val_size=16", "--data.test_size=16",
        f"--data.chat_template={CHAT_TEMPLATE}", "--trainer.max_epochs=2")
_RUNS: dict = {}


def fit(tmp_path_factory, model, pairs_file, name: str, *extra: str, policy: str = "Full", timeout: int = 300):
    if name not in _RUNS:
        run = tmp_path_factory.mktemp(name)
        out = run_ftlab(*task_args(run, model, "PreferenceData", pairs_file, "Preference", *ARGS, *extra,
                                   *probe(run / "batches"), policy=policy), timeout=timeout)
        assert out.returncode == 0, out.stderr[-3000:]
        _RUNS[name] = (run, json.loads((run / "summary.json").read_text()), out.stderr)
    return _RUNS[name]


def _single(tmp_path_factory, tiny_causal, pairs_file):
    # 2 batches of 4 pairs per step: the global batch of the 2-rank run
    return fit(tmp_path_factory, tiny_causal, pairs_file, "dpo-full", "--trainer.accumulate_grad_batches=2")


def _single_precomputed(tmp_path_factory, tiny_causal, pairs_file):
    return fit(tmp_path_factory, tiny_causal, pairs_file, "dpo-precomputed", "--trainer.accumulate_grad_batches=2",
               "--model.task.precompute_reference=true")


def test_dpo_raises_reward_accuracy_and_the_export_loads(tmp_path_factory, tiny_causal, pairs_file):
    run, summary, _ = _single(tmp_path_factory, tiny_causal, pairs_file)
    assert summary["task"] == "preference"
    assert summary["steps"] == 2 * 11 and summary["train_samples"] == 2 * 88  # 88 training pairs, 8 per step
    history = summary["val_history"]
    assert [h["step"] for h in history] == [11, 22]
    assert history[-1]["val/reward_accuracy"] >= 0.9 and summary["best/val/reward_accuracy"] >= 0.9
    assert history[-1]["val/reward_margin"] > history[0]["val/reward_margin"] > 0
    assert summary["val/logps_chosen"] > summary["val/logps_rejected"]
    assert summary["test/reward_accuracy"] >= 0.9
    model = AutoModelForCausalLM.from_pretrained(run / "export")  # plain transformers
    assert not any(k.startswith("reference") for k in load_file(run / "export" / "model.safetensors"))
    assert model.config.num_hidden_layers == 2


def test_precomputed_reference_trains_exactly_like_the_frozen_copy(tmp_path_factory, tiny_causal, pairs_file):
    _, frozen, _ = _single(tmp_path_factory, tiny_causal, pairs_file)
    run, summary, log = _single_precomputed(tmp_path_factory, tiny_causal, pairs_file)
    assert "reference log-probs of 120 pairs computed once" in log
    for key in ("val/loss", "val/reward_margin", "val/reward_accuracy", "test/reward_margin"):
        assert summary[key] == pytest.approx(frozen[key], rel=1e-5, abs=1e-6), key
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert not any(k.startswith("reference") for k in ckpt)  # no reference model held


# strategy -> (options, whether the reference is sharded): each places the reference another way
TWO_RANKS = {  # the frozen copies load with the trained model's attention kernel
    "fsdp": (("--model.attn_implementation=eager",), True),  # a frozen copy, sharded like the model
    "deepspeed_stage_3": (("--model.attn_implementation=eager",), True),  # a frozen copy, partitioned like it
    # precomputed: each rank scores its share of the pairs; its own cache, so that the table is computed here
    "ddp": (("--model.task.precompute_reference=true",), False),
}


@pytest.mark.parametrize("strategy", list(TWO_RANKS))
def test_two_ranks_train_batch_by_batch_like_one_process(tmp_path_factory, tiny_causal, pairs_file, strategy):
    """The same global batch (2 ranks x 4 pairs; one process: 2 accumulated batches of 4): every batch of every
    rank has the loss the one-process run had on it, at the same step; validation and the weights agree."""
    options, sharded = TWO_RANKS[strategy]
    precomputed = "--model.task.precompute_reference=true" in options
    single_run, single, _ = (_single_precomputed if precomputed else _single)(tmp_path_factory, tiny_causal,
                                                                                 pairs_file)
    cache = tmp_path_factory.mktemp(f"cache-{strategy}")
    run, summary, log = fit(tmp_path_factory, tiny_causal, pairs_file, f"dpo-{strategy}", *options,
                            f"--trainer.strategy={strategy}", "--trainer.devices=2", f"--data.cache_dir={cache}",
                            timeout=600)
    assert summary["world_size"] == 2
    if precomputed:
        assert "reference log-probs of 120 pairs computed once" in log
    for rank in (0, 1):
        ref = json.loads((run / "batches" / f"rank{rank}.json").read_text())["reference"]
        if sharded:  # each rank holds its share of the frozen reference, not a whole copy
            assert 0 < ref["held"] < 0.6 * ref["total"], ref
            assert ref["attn"] == "eager", ref
        else:
            assert ref["total"] == 0  # no reference model held while training
    mine, theirs = batches(run / "batches"), batches(single_run / "batches")
    assert len(theirs) == 2 * 22 and sorted(mine) == sorted(theirs)  # the same pairs in the same batches
    for key, batch in theirs.items():
        assert mine[key]["step"] == batch["step"], key
        assert mine[key]["loss"] == pytest.approx(batch["loss"], abs=1e-5), (key, mine[key], batch)
    assert summary["steps"] == single["steps"] and summary["train_samples"] == single["train_samples"]
    for first, other in zip(single["val_history"], summary["val_history"], strict=True):
        assert other["val/loss"] == pytest.approx(first["val/loss"], rel=1e-4)
        assert other["val/reward_margin"] == pytest.approx(first["val/reward_margin"], rel=1e-4)
    for name, tensor in load_file(single_run / "export" / "model.safetensors").items():
        torch.testing.assert_close(load_file(run / "export" / "model.safetensors")[name], tensor, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows,batch_size,ranks", [(1, 8, 2), (3, 1, 2), (5, 2, 4), (17, 4, 3), (16, 8, 1)])
def test_reference_batches_score_every_row_once_in_as_many_forwards_on_every_rank(rows, batch_size, ranks):
    """Evaluation batches leave some ranks one short (1 row on 2 ranks: none; 3 rows of 1 on 2: 2 and 1): those
    run unscored filler forwards, since sharded forwards are collectives."""
    lengths = [5 + i % 3 for i in range(rows)]
    per_rank = [rank_batches(lengths, batch_size, ranks, rank) for rank in range(ranks)]
    assert len({len(b) for b in per_rank}) == 1  # as many forwards on every rank
    scored = sorted(i for b in per_rank for indices, keep in b if keep for i in indices)
    assert scored == list(range(rows))


def test_precomputed_on_two_sharded_ranks_scores_every_pair_even_of_a_split_smaller_than_the_ranks(
        tmp_path, tiny_causal, pairs_file):
    """A 1-pair validation split on 2 ranks: one rank has no pair of it to score, but under FSDP every forward
    is a collective, so it must still run as many as the other (before the fix: a collective mismatch). The
    table holds every pair's log-probs under the starting model, whichever rank scored it."""
    run = tmp_path / "run"
    options = ("--data.val_size=1", f"--data.cache_dir={tmp_path / 'cache'}")
    # validating a 1-row split on 2 ranks is refused (ftlab.data.samplers: a rank would have no batch): off here;
    # the table is computed for every split regardless
    out = run_ftlab(*task_args(run, tiny_causal, "PreferenceData", pairs_file, "Preference", *ARGS, *options,
                               "--model.task.precompute_reference=true", "--trainer.strategy=fsdp",
                               "--trainer.devices=2", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                               "--test_after_fit=false", "--collective_timeout=60"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reference log-probs of 120 pairs computed once" in out.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    (path,) = (tmp_path / "cache").glob("*/reference-logps-*.pt")
    table = torch.load(path, weights_only=True)

    from ftlab.data import PreferenceData

    data = PreferenceData(str(pairs_file), tokenizer=str(tiny_causal), chat_template=CHAT_TEMPLATE, max_length=32,
                          val_size=1, test_size=16, cache_dir=str(tmp_path / "cache"))
    data.setup()
    assert len(data.splits["validation"]) == 1 and data.pair_rows == len(table) == 120
    frozen = FrozenCopy(FrozenTeacher(AutoModelForCausalLM.from_pretrained(tiny_causal)))
    expected = torch.full((120, 2), float("nan"), dtype=torch.float64)
    for split in data.splits.values():
        batch = data.collator()([{k: v for k, v in row.items() if k != "length"} for row in split])
        ref = frozen.pair_logps(None, batch)
        expected[batch["pair_index"]] = torch.stack([ref.chosen, ref.rejected], 1).double()
    assert not table.isnan().any()
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-4)


def test_a_run_resumed_mid_epoch_ends_like_the_uninterrupted_one(tmp_path, tiny_causal, pairs_file):
    """Accumulation 2, stopped at step 3 of 11 in the epoch and resumed to step 6: the same batches at the same
    steps with the same losses, and the same weights, as the run never stopped."""
    common = [*ARGS, "--trainer.accumulate_grad_batches=2", "--trainer.max_epochs=1", "--test_after_fit=false",
              "--trainer.num_sanity_val_steps=0",
              # a learning rate that does not depend on max_steps, which differs between the runs
              "--model.optim.schedule=constant", "--model.optim.warmup_ratio=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def run(folder, steps, *extra):
        run_cli(task_args(folder, tiny_causal, "PreferenceData", pairs_file, "Preference", *common,
                          f"--trainer.max_steps={steps}", *probe(folder / f"batches-{steps}"), *extra))

    run(straight, 6)
    run(resumed, 3)
    run(resumed, 6, "--ckpt_path=last")
    whole, first, second = (batches(folder) for folder in (straight / "batches-6", resumed / "batches-3",
                                                            resumed / "batches-6"))
    assert sorted(b["step"] for b in first.values()) == [0, 0, 1, 1, 2, 2]
    assert sorted(b["step"] for b in second.values()) == [3, 3, 4, 4, 5, 5]  # went on where it stopped
    assert {**first, **second} == whole  # the same pairs, steps and losses, bit for bit
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (straight, resumed)]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 6
    assert summaries[0]["train_samples"] == summaries[1]["train_samples"] == 6 * 8
    for name, tensor in load_file(straight / "export" / "model.safetensors").items():
        assert torch.equal(tensor, load_file(resumed / "export" / "model.safetensors")[name]), name


def test_lora_with_the_adapter_off_reference_exports_a_merged_model(tmp_path_factory, tiny_causal, pairs_file):
    run, summary, _ = fit(tmp_path_factory, tiny_causal, pairs_file, "dpo-lora", "--model.optim.lr=0.05",
                          "--model.policy.dropout=0", "--trainer.max_epochs=3", policy="Adapter")
    assert summary["trainable_params"] < summary["total_params"]
    assert summary["val_history"][-1]["val/reward_margin"] > 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert not any(k.startswith("reference") for k in ckpt)  # the adapter switched off is the reference
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_compare_ranks_preference_variants_by_reward_accuracy(tmp_path, tiny_causal, pairs_file):
    """`ftlab compare` on two preference losses: each variant's runs, ranked on the task's own metric."""
    import yaml

    cfg = tmp_path / "pairs.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"accelerator": "cpu", "devices": 1, "logger": False,
                                               "enable_progress_bar": False},
                                   "model": {"task": {"class_path": "Preference"}}}))  # before the variants' options
    variants = tmp_path / "variants.yaml"
    variants.write_text(yaml.safe_dump({"dpo": ["--model.task.loss=dpo"], "simpo": ["--model.task.loss=simpo"]}))
    fit_args = [a for a in task_args(tmp_path, tiny_causal, "PreferenceData", pairs_file, "Preference", *ARGS)[4:]
                if not a.startswith("--model.task=")]
    out = run_ftlab("compare", "--config", str(cfg), "--variants-file", str(variants), "--budget-steps", "6",
                    "--seeds", "1", "--runs-dir", str(tmp_path / "runs"), *fit_args, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "compare-pairs" / "report.json").read_text())
    assert report["metric"] == "test/reward_accuracy" and report["higher_is_better"] is True
    for name in ("dpo", "simpo"):
        summary = json.loads((tmp_path / "runs" / "compare-pairs" / name / "seed0" / "summary.json").read_text())
        assert summary["steps"] == 6 and summary["main_metric"] == "reward_accuracy"
        assert report["variants"][name]["metric_mean"] == summary["test/reward_accuracy"]


def _first_loss(tmp_path, model, pairs_file, name: str, *extra: str) -> tuple[float, str]:
    """The first training batch's DPO loss of a one-step LoRA run, and its log."""
    run = tmp_path / name
    out = run_ftlab(*task_args(run, model, "PreferenceData", pairs_file, "Preference", *ARGS, "--trainer.max_steps=1",
                               "--model.policy.dropout=0", "--trainer.limit_val_batches=0", "--test_after_fit=false",
                               *probe(run / "batches"), *extra, policy="Adapter"),
                    env={"FTLAB_CACHE": str(tmp_path / "cache")})  # this test's runs share one cache, no other's
    assert out.returncode == 0, out.stderr[-3000:]
    first = min(batches(run / "batches").values(), key=lambda b: b["step"])
    return first["loss"], out.stderr


def test_the_reference_is_the_starting_model_whatever_the_adapter_init_or_quantization(tmp_path, tiny_causal,
                                                                                       pairs_file):
    """At step 0 the trained model is its reference: every pair's reward is 0 and the DPO loss is log 2. PiSSA
    moves part of the base into the adapter, so the adapter switched off is not the starting model: refused
    unless the reference is precomputed, which scores the starting model itself. A precomputed table is keyed
    by the starting model: a QLoRA run next to a LoRA run on the same data and model (one data cache) scores
    its own 4-bit base, not the LoRA run's table."""
    pissa = '--model.policy.options={"init_lora_weights": "pissa"}'
    out = run_ftlab(*task_args(tmp_path / "refused", tiny_causal, "PreferenceData", pairs_file, "Preference", *ARGS,
                               pissa, policy="Adapter"))
    assert out.returncode == 2 and "init_lora_weights='pissa': that init moves part of the base" in out.stderr, \
        out.stderr[-2000:]
    loss, _ = _first_loss(tmp_path, tiny_causal, pairs_file, "pissa", pissa, "--model.task.precompute_reference=true")
    assert loss == pytest.approx(math.log(2), abs=1e-5)  # the adapter switched off gave 0.6883
    loss, log = _first_loss(tmp_path, tiny_causal, pairs_file, "lora", "--model.task.precompute_reference=true")
    assert loss == pytest.approx(math.log(2), abs=1e-6) and "computed once" in log
    loss, log = _first_loss(tmp_path, tiny_causal, pairs_file, "qlora", "--model.task.precompute_reference=true",
                            "--model.quantization.bits=4")
    assert "computed once" in log, log[-2000:]  # its own table, not the LoRA run's
    assert loss == pytest.approx(math.log(2), abs=1e-6)
