"""ftlab's Lightning callbacks."""

from ftlab.callbacks.run_outputs import RunOutputs

__all__ = ["RunOutputs"]
