"""Optimizers (`model.optim.name`) and the learning-rate schedule: each optimizer steps a small model and lowers
its loss, 8-bit AdamW's state takes <= 0.3x of AdamW's bytes, and the schedule gives the expected learning
rate at given steps (warmup_steps, min_lr_ratio). Refusals of impossible combinations are in test_qlora.py."""

import math

import pytest
import torch
from torch import nn

from ftlab.errors import ConfigError
from ftlab.optim import Optim


def _model() -> nn.Module:
    torch.manual_seed(0)  # matrices of >= 4,096 elements: bitsandbytes keeps smaller ones' state in 32 bits
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decay, "names": [], "weight_decay": 0.01}, {"params": rest, "names": [], "weight_decay": 0.0}]


def _train(optim: Optim, steps: int = 30) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
    model = _model()
    optimizer, scheduler = optim.build(_groups(model), total_steps=steps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 64, generator=g)
    y = x[:, :4].sum(dim=1, keepdim=True)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, optimizer, losses


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """As summary.json's optimizer_state_bytes_per_rank counts them: every state tensor."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("name,lr,extra", [("adamw", 3e-3, {}), ("adamw_8bit", 3e-3, {}), ("adafactor", 3e-3, {}),
                                           ("sgd", 3e-2, {"momentum": 0.9})])
def test_each_optimizer_trains(name, lr, extra):
    _, optimizer, losses = _train(Optim(name=name, lr=lr, warmup_steps=2, **extra))
    assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])
    expected = {"adamw": "AdamW", "adamw_8bit": "AdamW8bit", "adafactor": "Adafactor", "sgd": "SGD"}[name]
    assert type(optimizer).__name__ == expected
    if name == "adamw":
        assert optimizer.defaults["fused"]  # torch's fused kernel, as before
    if name == "adafactor":  # a fixed learning rate: the schedule's, not Adafactor's own relative step
        assert not optimizer.defaults["relative_step"] and not optimizer.defaults["scale_parameter"]
    if name == "sgd":
        assert optimizer.defaults["momentum"] == 0.9


def test_8bit_adamw_state_takes_under_a_third_of_adamw_bytes():
    _, adamw, _ = _train(Optim(name="adamw"), steps=2)
    _, adamw8, _ = _train(Optim(name="adamw_8bit"), steps=2)
    full, low = state_bytes(adamw), state_bytes(adamw8)
    assert low <= 0.3 * full, (low, full)
    matrices = [s for p, s in adamw8.state.items() if p.ndim >= 2 and p.numel() >= 256]
    assert matrices and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in matrices)


def test_8bit_adamw_quantizes_small_matrices_as_lora_has_them():
    """LoRA's matrices are small (a k projection's B: 192 x 16 = 3,072 elements), under bitsandbytes' 4,096
    minimum: they get 8-bit state too; a 1-D tensor of the same size (a bias, a norm) keeps fp32 state."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(16, 576) * 0.01), nn.Parameter(torch.zeros(192, 16))
    bias = nn.Parameter(torch.zeros(3072))
    optimizer = Optim(name="adamw_8bit", lr=1e-2).optimizer([{"params": [a, b], "names": []},
                                                             {"params": [bias], "names": [], "weight_decay": 0.0}])
    x = torch.randn(8, 576)
    for _ in range(3):
        ((x @ a.T @ b.T - 1).square().sum() + (bias - 1).square().sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [optimizer.state[p]["state1"].dtype for p in (a, b, bias)] == [torch.uint8, torch.uint8, torch.float32]
    assert b.abs().sum() > 0  # B, zero at start as LoRA's is, trained through its 8-bit moments
    lora = sum(optimizer.state[p][k].numel() * optimizer.state[p][k].element_size() for p in (a, b)
               for k in ("state1", "state2", "absmax1", "absmax2"))  # the quantization maps are shared
    assert lora <= 0.3 * 8 * (a.numel() + b.numel()), lora


def _lrs(optim: Optim, total: int) -> list[float]:
    """The learning rate each optimizer step runs at."""
    p = nn.Parameter(torch.zeros(2))
    optimizer, scheduler = optim.build([{"params": [p], "names": ["p"]}], total_steps=total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_steps_and_min_lr_linear():
    lrs = _lrs(Optim(lr=1.0, warmup_steps=4, schedule="linear", min_lr_ratio=0.1), total=14)
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lrs[14] == pytest.approx(0.1) and min(lrs[4:]) == pytest.approx(0.1)


def test_cosine_to_min_lr():
    lrs = _lrs(Optim(lr=2.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.25), total=10)
    assert lrs[0] == pytest.approx(2.0)
    assert lrs[5] == pytest.approx(2.0 * (0.25 + 0.75 * 0.5))
    assert lrs[3] == pytest.approx(2.0 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 0.3))))
    assert lrs[10] == pytest.approx(0.5)


def test_defaults_unchanged_transformers_schedules():
    """min_lr_ratio 0 and the default warmup (6% of the steps) are transformers' linear/cosine schedules."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for schedule, reference in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
        p = nn.Parameter(torch.zeros(1))
        ref_opt = torch.optim.SGD([p], lr=1.0)
        ref = reference(ref_opt, num_warmup_steps=6, num_training_steps=100)
        expected = []
        for _ in range(101):
            expected.append(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref.step()
        assert Optim().warmup(100) == 6
        assert _lrs(Optim(lr=1.0, schedule=schedule), total=100) == pytest.approx(expected)


@pytest.mark.parametrize("kwargs,message", [
    ({"warmup_ratio": 0.1, "warmup_steps": 10}, "warmup_ratio=0.1 and warmup_steps=10 are both set; give one of them"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio=1.5 must be in [0, 1)"),
    ({"min_lr_ratio": 0.1, "schedule": "constant"}, "applies to the linear and cosine schedules"),
    ({"momentum": 0.9}, "momentum=0.9 is an SGD option"),
    ({"name": "sgd", "fused": True}, "fused=true is an option of torch's AdamW"),
    ({"warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
])
def test_bad_optim_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        Optim(**kwargs)
