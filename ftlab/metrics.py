"""Metrics torchmetrics does not have: entity-level F1 for BIO tagging, token-weighted perplexity, and
ROUGE-L kept as sums. Each keeps sums as metric states, so torchmetrics syncs them across ranks (one
all-reduce per state, the same number on every rank)."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.text import BLEUScore


class KeepStateDtypes:
    """Metric states keep their dtype when the module is cast: Lightning's bf16-true / 16-true plugins cast the
    whole LightningModule with `.to(dtype)`, which torchmetrics applies to floating states (it guards only
    `.half()` and the like). Sums of thousands of tokens or sentences in bf16 stop growing; in fp16 they
    overflow (a loss weight sum past 65,504 is inf, the mean NaN)."""

    def _apply(self, fn, exclude_state=""):
        if self._dtype_convert:  # set_dtype: an explicit change of the states' dtype
            return super()._apply(fn, exclude_state)
        dtypes = {k: v.dtype for k, v in self._defaults.items() if isinstance(v, torch.Tensor)}
        this = super()._apply(fn, exclude_state)
        for key, dtype in dtypes.items():
            value = getattr(this, key)
            if isinstance(value, torch.Tensor) and value.dtype != dtype:
                setattr(this, key, value.to(dtype))
                this._defaults[key] = this._defaults[key].to(dtype)
        return this


class Mean(KeepStateDtypes, MeanMetric):
    """A weighted mean (the evaluation loss: weights are token counts) summed in float64, whatever the module's dtype."""

    def __init__(self):
        super().__init__()
        self.set_dtype(torch.float64)


class BLEU(KeepStateDtypes, BLEUScore):
    """torchmetrics' BLEU, its n-gram counts kept in their dtype under a bf16/fp16 module."""


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO/IOB2 (or IOBES) tag sequence, with the conlleval semantics that
    seqeval uses by default: an I- after O or after another type starts an entity."""
    spans, start, kind, prev = set(), None, "", "O"
    for i, tag in enumerate([*tags, "O"]):
        pos, _, typ = tag.partition("-") if tag != "O" else ("O", "", "")
        ends = start is not None and (
            prev[0] in "ES" or (pos in "BSO" and prev[0] in "BI") or (prev != "O" and typ != kind))
        if ends:
            spans.add((kind, start, i - 1))
            start = None
        starts = pos in "BS" or (pos in "IE" and (prev[0] in "ESO" or typ != kind)) or (pos != "O" and start is None)
        if starts and pos != "O":
            start, kind = i, typ
        prev = tag
    return spans


class EntityF1(Metric):
    """Entity-level micro precision, recall and F1 (an entity counts only when its type and exact span
    match), from word-level tag ids; positions labelled -100 are not words and are skipped."""

    full_state_update = False

    def __init__(self, label_names: list[str]):
        super().__init__()
        self.label_names = list(label_names)
        for name in ("tp", "n_pred", "n_true"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        for p_row, t_row in zip(preds.tolist(), target.tolist()):
            words = [(p, t) for p, t in zip(p_row, t_row) if t != -100]
            pred = entities([self.label_names[p] for p, _ in words])
            true = entities([self.label_names[t] for _, t in words])
            self.tp += len(pred & true)
            self.n_pred += len(pred)
            self.n_true += len(true)

    def compute(self) -> dict[str, torch.Tensor]:
        precision = self.tp / self.n_pred.clamp(min=1)
        recall = self.tp / self.n_true.clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        return {"precision": precision.float(), "recall": recall.float(), "f1": f1.float()}


class Perplexity(KeepStateDtypes, Metric):
    """exp(mean negative log-likelihood per predicted token) over an epoch: every token counts once,
    whatever the batch it was in (a mean of batch perplexities would not)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self):
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mean_loss: torch.Tensor, tokens: int | torch.Tensor) -> None:
        if int(tokens) == 0:  # nothing scored (its mean loss is NaN): nothing to add
            return
        self.nll += mean_loss.detach().double() * tokens
        self.tokens += int(tokens)

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.tokens.clamp(min=1)).float()


class RougeL(KeepStateDtypes, Metric):
    """Mean sentence-level ROUGE-L (precision, recall, F-measure), as torchmetrics' ROUGEScore computes it,
    kept as sums. ROUGEScore keeps one tensor per sentence and syncs them one all-gather each: ranks with
    another number of sentences (an odd evaluation split on 2 ranks) wait on each other forever."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("fmeasure", "precision", "recall"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sentences", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], target: list[str]) -> None:
        from torchmetrics.functional.text import rouge_score

        for pred, ref in zip(preds, target, strict=True):
            scores = rouge_score(pred, ref, rouge_keys="rougeL")
            for name in ("fmeasure", "precision", "recall"):
                setattr(self, name, getattr(self, name) + float(scores[f"rougeL_{name}"]))
        self.sentences += len(preds)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.sentences.clamp(min=1)
        return {f"rougeL_{name}": (getattr(self, name) / n).float() for name in ("fmeasure", "precision", "recall")}
