"""`model.loss_chunk_size`: the chunked loss equals the model's own (loss and every gradient, 1e-5) for SFT
(padded and packed rows, tied and untied heads, LoRA on the head, a soft-capped head), distillation and
preference; it keeps far less than the full logits for backward; a real fit with it; a 2-rank FSDP run
equals the unchunked one; what it cannot apply to is refused."""

import copy
import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from ftlab.errors import ConfigError
from ftlab.tasks import CausalLM, Distillation, DomainAdaptation, Preference, SequenceClassification, chunked_loss
from ftlab.tasks.distillation import FrozenTeacher
from ftlab.tasks.preference_reference import FrozenCopy
from tests.conftest import fit_args, run_ftlab
from tests.tasks.conftest import CHAT_TEMPLATE, task_args

VOCAB = 1000  # large beside the hidden size (32), as a real LM's: what chunking is for
CHUNK = 7  # several chunks per batch, the last one short


def _llama(seed: int = 0, tied: bool = False, layers: int = 2, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config).train()


def _batch(rows: int = 3, length: int = 24, packed: bool = False, vocab: int = VOCAB, seed: int = 1) -> dict:
    """Rows of a prompt (-100 labels), an answer and right padding; or packed rows of 3 examples each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, length), generator=g)
    labels = ids.clone()
    if packed:  # position ids restart per example; no attention mask (as the packing collator makes them)
        starts = [0, length // 3, 2 * length // 3]
        pos = torch.cat([torch.arange(b - a) for a, b in zip(starts, [*starts[1:], length])]).repeat(rows, 1)
        for a in starts:
            labels[:, a:a + 3] = -100  # each example's prompt
        return {"input_ids": ids, "position_ids": pos, "labels": labels}
    mask = torch.ones_like(ids)
    for r in range(rows):
        prompt, pad = 4 + 2 * r, 3 * r
        labels[r, :prompt] = -100
        if pad:
            mask[r, -pad:], labels[r, -pad:], ids[r, -pad:] = 0, -100, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _chunked(task):
    task.set_loss_chunk_size(CHUNK)
    return task


def _loss_and_grads(task, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = task.loss(task.forward(model, batch), batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(reference, chunked) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = reference, chunked
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, name  # every trainable parameter is reached
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("tied,packed", [(False, False), (True, False), (True, True)])
def test_sft_loss_and_gradients_equal_the_models_own(tied, packed):
    model, batch = _llama(tied=tied), _batch(packed=packed)
    assert (batch["labels"][:, 1:] != -100).sum() > 4 * CHUNK
    _assert_same(_loss_and_grads(CausalLM(), model, batch), _loss_and_grads(_chunked(CausalLM()), model, batch))


def test_lora_on_the_lm_head_gets_the_same_gradients():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0: no gradient would reach A
            torch.nn.init.normal_(p, std=0.1)
    assert any("lm_head.lora" in n for n, p in model.named_parameters() if p.requires_grad)
    batch = _batch()
    _assert_same(_loss_and_grads(CausalLM(), model, batch), _loss_and_grads(_chunked(CausalLM()), model, batch))


def test_a_soft_capped_head_is_reproduced_and_an_unknown_logit_transform_refused():
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, head_dim=16, final_logit_softcapping=3.0,
                          max_position_embeddings=128)
    gemma = AutoModelForCausalLM.from_config(config).train()
    batch = _batch()
    _assert_same(_loss_and_grads(CausalLM(), gemma, batch), _loss_and_grads(_chunked(CausalLM()), gemma, batch))
    # a Llama does not cap its logits: told it does, the head no longer gives the model's logits
    llama = _llama()
    llama.config.final_logit_softcapping = 3.0
    with pytest.raises(ConfigError, match="logits are not its LM head's output"):
        _chunked(CausalLM()).forward(llama, batch)


def test_distillation_loss_and_gradients_equal_the_full_logits_path():
    student, batch = _llama(tied=True), _batch()
    teacher = FrozenTeacher(_llama(seed=5, layers=3))

    def task(chunk: bool) -> Distillation:
        t = Distillation(teacher="unused", student=CausalLM(), alpha=0.3, temperature=2.0)
        t._teacher = teacher
        return _chunked(t) if chunk else t

    reference, chunked = _loss_and_grads(task(False), student, batch), _loss_and_grads(task(True), student, batch)
    _assert_same(reference, chunked)
    assert not any(p.grad is not None for p in teacher.parameters())


@pytest.mark.parametrize("loss", ["simpo", "dpo"])
def test_preference_loss_and_gradients_equal_the_full_logits_path(loss):
    model = _llama()
    batch = _batch(rows=4)  # 2 pairs: chosen rows then rejected rows

    def task(chunk: bool) -> Preference:
        t = _chunked(Preference(loss=loss)) if chunk else Preference(loss=loss)
        if loss == "dpo":  # a frozen reference copy, a little away from the trained model; chunked as it is
            frozen = copy.deepcopy(model)
            with torch.no_grad():
                for p in frozen.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.02)
            t.reference = FrozenCopy(FrozenTeacher(frozen), t.chunked)
            frozen.register_forward_hook(lambda m, args, out: widths.append(out.logits.shape[1]))
        return t

    widths: list[int] = []  # the positions the frozen reference computed logits for, per forward

    reference, chunked = _loss_and_grads(task(False), model, batch), _loss_and_grads(task(True), model, batch)
    _assert_same(reference, chunked)
    if loss == "dpo":  # the reference pass is chunked too: its logits of one position only, not of all 24
        assert widths == [24, 1]
    with torch.no_grad():
        a, b = task(False).forward(model, batch), task(True).forward(model, batch)
    for key in ("logps_chosen", "logps_rejected", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)


def _saved_bytes(model, forward) -> int:
    """Bytes autograd keeps for backward (activations; the weights excluded) after `forward()`."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()  # the graph was complete
    return sum(seen.values())


def test_the_chunked_loss_keeps_less_than_one_chunk_of_logits_for_backward():
    vocab, rows, length, chunk = 8192, 2, 64, 16
    model, batch = _llama(vocab=vocab, tied=True), _batch(rows=rows, length=length, vocab=vocab)
    full_logits, chunk_logits = rows * length * vocab * 4, chunk * vocab * 4  # fp32
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # the decoder body alone, up to the last hidden state (what every path keeps)
    body = _saved_bytes(model, lambda: chunked_loss.last_hidden(model, inputs)[0].sum())
    own_task, chunked_task = CausalLM(), CausalLM()
    chunked_task.set_loss_chunk_size(chunk)
    own = _saved_bytes(model, lambda: own_task.loss(own_task.forward(model, batch), batch))
    chunked = _saved_bytes(model, lambda: chunked_task.loss(chunked_task.forward(model, batch), batch))
    assert own - body >= full_logits, (own, body)  # the model's own loss keeps the log-softmax of all logits
    assert chunked - body < chunk_logits / 8, (chunked, body)  # chunks keep their hidden states, not logits
    assert chunked < 0.2 * own, (own, chunked)


def test_collective_chunks_keep_one_count_from_step_to_step():
    """Where each chunk's head call is a collective (a ZeRO-3 head), every call makes as many chunks as the
    most any call has needed: ZeRO-3 prefetches from the module order of the step before and drops it at a step
    that calls the head once more or once less. The padding chunks are empty (the values are the rows' own)."""
    loss = chunked_loss.ChunkedLoss(4)
    calls = []

    def chunk(x):
        calls.append(len(x))
        return (x * 2,)

    def chunks(rows, collective, grad=True):
        calls.clear()
        x = torch.arange(rows, dtype=torch.float32)
        with torch.set_grad_enabled(grad):
            (out,) = loss._per_token(chunk, collective, x)
        assert torch.equal(out, x * 2)
        return len(calls)

    # collective: the most so far (3, then 4); without gradients (evaluation) counted apart; not collective:
    # what the rows need
    counts = [chunks(10, True), chunks(5, True), chunks(30, True, grad=False), chunks(14, True), chunks(1, True),
              chunks(5, True, grad=False), chunks(5, False)]
    assert counts == [3, 3, 8, 4, 4, 8, 2]
    assert calls == [4, 1]


def test_what_the_chunked_loss_cannot_apply_to_is_refused():
    with pytest.raises(ConfigError, match="task sequence-classification computes no token-level loss"):
        chunked_loss.configure(SequenceClassification(), 512)
    with pytest.raises(ConfigError, match="a sequence-classification student has no loss over a vocabulary"):
        chunked_loss.configure(Distillation(teacher="x"), 512)
    with pytest.raises(ConfigError, match="model.loss_chunk_size=-1 must be >= 0"):
        chunked_loss.configure(CausalLM(), -1)
    with pytest.raises(ConfigError, match="the masked-LM objective"):
        chunked_loss.configure(DomainAdaptation(objective="mlm"), 512)
    auto = DomainAdaptation()
    chunked_loss.configure(auto, 512)
    with pytest.raises(ConfigError, match="the masked-LM objective"):
        auto.resolve(type("BertConfig", (), {"model_type": "bert"})())
    from ftlab.policies import Adapter

    with pytest.raises(ConfigError, match="prompt-learning adapters add virtual tokens"):
        chunked_loss.configure(CausalLM(), 512, Adapter(method="prompt"))
    chunked_loss.configure(CausalLM(), 0, Adapter(method="prompt"))  # off: nothing to refuse
    chunked_loss.configure(CausalLM(), 512, Adapter(method="adalora"))  # its config class cannot be built bare
    from transformers import TrOCRConfig

    with pytest.raises(ConfigError, match="TrOCRForCausalLM cannot skip computing its full logits"):
        chunked_loss.check_model(TrOCRConfig(), 512)
    chunked_loss.check_model(LlamaConfig(), 512)


def test_a_classification_run_with_chunking_is_refused_in_one_line(tmp_path, tiny_bert, reviews_csv):
    out = run_ftlab(*fit_args(tmp_path / "run", tiny_bert, reviews_csv, "--model.loss_chunk_size=64"))
    assert out.returncode == 2
    assert ("model.loss_chunk_size=64: task sequence-classification computes no token-level loss over a vocabulary"
            in out.stderr)
    assert "policy" not in out.stderr.split("error:")[0]  # no model was built (its summary line names the policy)


def test_sft_fit_with_chunked_loss(tmp_path, tiny_models, chat_file):
    run = tmp_path / "run"
    out = run_ftlab(*task_args(run, tiny_models["llama"], "LanguageModelingData", chat_file, "CausalLM",
                               f"--data.chat_template={CHAT_TEMPLATE}", "--data.max_length=64", "--data.batch_size=4",
                               "--trainer.max_epochs=3", "--model.task.max_new_tokens=4", "--model.loss_chunk_size=16"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    ppl = [h["val/perplexity"] for h in summary["val_history"]]
    assert len(ppl) == 3 and ppl[2] < ppl[1] < ppl[0] and ppl[-1] < 0.9 * ppl[0], ppl  # it learns
    assert 1 < summary["test/perplexity"] < 20


class LossLog(L.Callback):
    """Writes every training step's loss, per rank, to `folder/losses-rank{N}.json`."""

    def __init__(self, folder: str):
        self.folder, self.losses = folder, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        with open(f"{self.folder}/losses-rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.losses, f)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory, tiny_models):
    """The tiny Llama with its head tied to the input embeddings (as SmolLM2's): FSDP keeps it in the root unit."""
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-llama-tied"
    config = AutoConfig.from_pretrained(tiny_models["llama"])
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("strategy,tied,task", [
    ("fsdp", False, "CausalLM"), ("fsdp", True, "CausalLM"), ("deepspeed_stage_3", True, "CausalLM"),
    # packed rows: before the fix the unchunked teacher ran with a KV cache, its examples attending to each other
    ("fsdp", False, "Distillation")],
    ids=["fsdp-untied-head", "fsdp-tied-head-in-root", "zero3-tied", "fsdp-distillation"])
def test_sharded_two_ranks_chunked_equals_unchunked(tmp_path, tiny_models, tied_llama, chat_file, strategy, tied, task):
    """FSDP2: with chunking the head stays in the root unit (untied: otherwise its own unit), gathered once for
    all chunks and resharded by FSDP's post-backward; tied, it is there anyway. ZeRO-3: its module hooks fetch
    the partitioned head in each chunk, every rank running as many. Each way the gradients are reduced as in the
    unchunked run: the losses of later steps agree too. Distillation: the sharded teacher's head too (gathered
    once without gradients, and again when backward recomputes a chunk)."""
    teacher = ["--model.task.teacher=" + str(tiny_models["llama"]), "--model.task.student=CausalLM",
               "--model.task.alpha=0.5"] if task == "Distillation" else []
    model = tied_llama if tied else tiny_models["llama"]
    losses = {}
    for chunk in (0, 8):
        run = tmp_path / f"run{chunk}"
        run.mkdir()
        out = run_ftlab(*task_args(run, model, "LanguageModelingData", chat_file, task,
                                   f"--data.chat_template={CHAT_TEMPLATE}", "--data.max_length=64",
                                   "--data.batch_size=2", f"--trainer.strategy={strategy}", "--trainer.devices=2",
                                   "--trainer.max_steps=4", "--test_after_fit=false",
                                   *(teacher or ["--model.task.max_new_tokens=2"]), f"--model.loss_chunk_size={chunk}",
                                   "--trainer.callbacks+=tests.tasks.test_chunked_loss.LossLog",
                                   f"--trainer.callbacks.folder={run}"), timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        losses[chunk] = [json.loads((run / f"losses-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(losses[0][0]) == 4 and losses[0][0] != losses[0][1]  # 4 steps, each rank its own rows
    for rank in (0, 1):
        assert losses[8][rank] == pytest.approx(losses[0][rank], rel=1e-5, abs=1e-5)


class ZeroTrace(L.Callback):
    """Writes, per rank, whether ZeRO-3's module-order trace (what it prefetches from) was complete at the start
    of each training step: C complete, R recording, I invalid, to `folder/trace-rank{N}.json`."""

    def __init__(self, folder: str):
        self.folder, self.states = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        coordinator = trainer.strategy.deepspeed_engine.optimizer.parameter_offload.get_param_coordinator()
        self.states.append("C" if coordinator.is_complete_trace() else "I" if coordinator.is_invalid_trace() else "R")

    def on_train_end(self, trainer, pl_module) -> None:
        with open(f"{self.folder}/trace-rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.states, f)


def test_zero3_keeps_prefetching_while_the_chunk_count_varies(tmp_path, tiny_models, chat_file):
    """Each batch labels another number of tokens: one more or one fewer chunk changed the order ZeRO-3 calls
    modules in, and it dropped its trace (no prefetching, the head gathered again for each chunk) in most steps
    (complete at the start of 2 steps of 10 before the fix). As many chunks every step: complete once warm."""
    out = run_ftlab(*task_args(tmp_path, tiny_models["llama"], "LanguageModelingData", chat_file, "CausalLM",
                               f"--data.chat_template={CHAT_TEMPLATE}", "--data.max_length=64", "--data.batch_size=2",
                               "--trainer.strategy=deepspeed_stage_3", "--trainer.devices=2", "--trainer.max_steps=10",
                               "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                               "--test_after_fit=false", "--model.task.max_new_tokens=2", "--model.loss_chunk_size=8",
                               "--trainer.callbacks+=tests.tasks.test_chunked_loss.ZeroTrace",
                               f"--trainer.callbacks.folder={tmp_path}"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        states = json.loads((tmp_path / f"trace-rank{rank}.json").read_text())
        assert len(states) == 10 and states[5:] == ["C"] * 5, states  # warm: the first steps record, then hold
