"""Preference tuning: each loss against a hand computation, the three reference variants give the same loss,
real runs (DPO raises reward accuracy; precomputed reference = frozen copy; 2-rank FSDP = one process; LoRA
with the adapter-off reference exports a merged model plain transformers loads)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ftlab.errors import ConfigError
from ftlab.tasks import Preference
from ftlab.tasks.distillation import FrozenTeacher
from ftlab.tasks.preference_losses import LOSSES, PairLogps, sequence_logps
from ftlab.tasks.preference_reference import AdapterOff, FrozenCopy, Precomputed
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
ARGS = ("--data.max_length=32", "--data.batch_size=4", "--data.val_size=16", "--data.test_size=16",
        f"--data.chat_template={CHAT_TEMPLATE}", "--trainer.max_epochs=2")
_RUNS: dict = {}


def fit(tmp_path_factory, model, pairs_file, name: str, *extra: str, policy: str = "Full", timeout: int = 300):
    if name not in _RUNS:
        run = tmp_path_factory.mktemp(name)
        out = run_ftlab(*task_args(run, model, "PreferenceData", pairs_file, "Preference", *ARGS, *extra,
                                   policy=policy), timeout=timeout)
        assert out.returncode == 0, out.stderr[-3000:]
        _RUNS[name] = (run, json.loads((run / "summary.json").read_text()), out.stderr)
    return _RUNS[name]


def _single(tmp_path_factory, tiny_causal, pairs_file):
    # 2 batches of 4 pairs per step: the global batch of the 2-rank run
    return fit(tmp_path_factory, tiny_causal, pairs_file, "dpo-full", "--trainer.accumulate_grad_batches=2")


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
    run, summary, log = fit(tmp_path_factory, tiny_causal, pairs_file, "dpo-precomputed",
                            "--trainer.accumulate_grad_batches=2", "--model.task.precompute_reference=true")
    assert "reference log-probs of 120 pairs computed once" in log
    for key in ("val/loss", "val/reward_margin", "val/reward_accuracy", "test/reward_margin"):
        assert summary[key] == pytest.approx(frozen[key], rel=1e-5, abs=1e-6), key
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert not any(k.startswith("reference") for k in ckpt)  # no reference model held


def test_fsdp_two_ranks_with_the_reference_sharded_matches_one_process(tmp_path_factory, tiny_causal, pairs_file):
    _, single, _ = _single(tmp_path_factory, tiny_causal, pairs_file)
    _, summary, log = fit(tmp_path_factory, tiny_causal, pairs_file, "dpo-fsdp", "--trainer.strategy=fsdp",
                          "--trainer.devices=2", timeout=600)
    held, total = (int(x.replace(",", "")) for x in
                   log.split("sharded, frozen: rank 0 read and holds ")[1].split(" parameters")[0].split(" of "))
    assert held < 0.6 * total  # the frozen reference is sharded, not copied whole to each rank
    assert summary["steps"] == single["steps"] and summary["train_samples"] == single["train_samples"]
    for first, other in zip(single["val_history"], summary["val_history"]):
        assert other["val/loss"] == pytest.approx(first["val/loss"], rel=1e-4)
        assert other["val/reward_margin"] == pytest.approx(first["val/reward_margin"], rel=1e-4)


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
