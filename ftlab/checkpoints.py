"""What a checkpoint must hold beyond Lightning's own for a resumed run to continue exactly."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class RngState(L.Callback):
    """Saves and restores the random number generators (dropout masks, sampling).

    Lightning checkpoints hold model, optimizer, scheduler and loop state, but not the RNGs: after a
    resume, dropout would draw different masks and the run would drift from the uninterrupted one.
    The state saved is the one at save time; it is put back at the first training batch after the
    restore, so that nothing run in between (sanity-check validation, model setup) shifts it.
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        # plain tensors, lists and numbers only: checkpoints load with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._restore(state)

    @staticmethod
    def _restore(state: dict) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
