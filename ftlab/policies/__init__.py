"""The policy switch: how much of the pretrained model trains.

`model.policy` takes one of these classes (by short name in YAML, e.g. `class_path: Adapter`), or any
subclass of `Policy` a user writes, by its import path.
"""

from ftlab.policies.adapter import Adapter
from ftlab.policies.base import Policy, set_trainable
from ftlab.policies.freeze import Freeze
from ftlab.policies.full import Full

__all__ = ["Adapter", "Freeze", "Full", "Policy", "set_trainable"]
