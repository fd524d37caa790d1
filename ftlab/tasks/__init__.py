"""Tasks: `model.task` takes one of these (or a user's `Task` subclass by import path)."""

from ftlab.tasks.base import Task
from ftlab.tasks.classification import SequenceClassification

__all__ = ["SequenceClassification", "Task"]
