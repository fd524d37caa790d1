"""A training DataLoader that Lightning treats as resumable mid-epoch.

The position itself (epoch, batches done) is checkpointed by the data module's `state_dict`:
Lightning restores a data module before it builds anything, while a loader's own state is handed back
only if the loader is created after the restore. ftlab's schedule asks for
`trainer.estimated_stepping_batches`, which creates the loader earlier. The loader delegates to the
data module, so Lightning sees it as resumable (no "unreliable results" warning) and there is one
source of truth.
"""

from __future__ import annotations

from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """A DataLoader whose position is the data module's checkpointed training position."""

    def __init__(self, *args, owner, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner = owner

    def state_dict(self) -> dict:
        return self._owner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._owner.load_state_dict(state)
