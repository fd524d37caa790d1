"""Preference losses on sequence log-probabilities, one function per name. Pure tensor code: each takes the
trained model's log-probs of the chosen and rejected responses (and the reference model's, where the loss
has one) and returns per-pair losses and implicit rewards.

- `dpo`: Rafailov et al. 2023, -log sigmoid(beta * ((c - c_ref) - (r - r_ref))), with conservative label
  smoothing (cDPO: a share `label_smoothing` of the pairs is taken as mislabelled).
- `ipo`: Azar et al. 2023, (h - 1 / (2 beta))^2 on the log-ratio difference h; like TRL, on per-token mean
  log-probs (summed log-probs make the 1 / (2 beta) target depend on response length).
- `hinge`: SLiC (Zhao et al. 2023), max(0, 1 - beta * ((c - c_ref) - (r - r_ref))).
- `simpo`: Meng et al. 2024, reference-free: -log sigmoid(beta * (mean c - mean r) - gamma).
- `orpo`: Hong et al. 2024, reference-free: NLL of the chosen response (per-token mean) + beta * -log
  sigmoid(log odds(chosen) - log odds(rejected)), odds from per-token mean probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Summed log-probs of each pair's chosen and rejected response tokens, and how many tokens each has."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean log-probs (length-normalised)."""
        return self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens


@dataclass
class PairLoss:
    """Per-pair losses and the implicit rewards the loss assigns to each response."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo(policy: PairLogps, ref: PairLogps, beta: float, label_smoothing: float = 0.0, **_) -> PairLoss:
    chosen, rejected = beta * (policy.chosen - ref.chosen), beta * (policy.rejected - ref.rejected)
    return PairLoss(_smoothed_sigmoid(chosen - rejected, label_smoothing), chosen, rejected)


def ipo(policy: PairLogps, ref: PairLogps, beta: float, **_) -> PairLoss:
    (pc, pr), (rc, rr) = policy.mean(), ref.mean()
    h = (pc - rc) - (pr - rr)
    return PairLoss((h - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr))


def hinge(policy: PairLogps, ref: PairLogps, beta: float, **_) -> PairLoss:
    chosen, rejected = beta * (policy.chosen - ref.chosen), beta * (policy.rejected - ref.rejected)
    return PairLoss(torch.relu(1 - (chosen - rejected)), chosen, rejected)


def simpo(policy: PairLogps, ref: None, beta: float, gamma: float = 0.5, label_smoothing: float = 0.0,
          **_) -> PairLoss:
    chosen, rejected = (beta * x for x in policy.mean())
    return PairLoss(_smoothed_sigmoid(chosen - rejected - gamma, label_smoothing), chosen, rejected)


def orpo(policy: PairLogps, ref: None, beta: float, **_) -> PairLoss:
    chosen, rejected = policy.mean()
    # log(1 - p) as log(-expm1(log p)): exact where p is close to 1 (log1p(-exp) loses it)
    log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    return PairLoss(-chosen - beta * F.logsigmoid(log_odds), beta * chosen, beta * rejected)


LOSSES: dict[str, Callable[..., PairLoss]] = {"dpo": dpo, "ipo": ipo, "hinge": hinge, "simpo": simpo, "orpo": orpo}
NEEDS_REFERENCE = {"dpo", "ipo", "hinge"}
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0, "orpo": 0.1}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens (labels != -100, after the causal shift), and their
    count. In float32 whatever the logits' dtype: bf16 log-probs summed over a response drift visibly."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != -100
    picked = torch.gather(logits, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - torch.logsumexp(logits, -1)) * keep
    return token_logps.sum(-1), keep.sum(-1)
