"""Tasks: `model.task` takes one of these (or a user's `Task` subclass by import path)."""

from ftlab.tasks.base import Task
from ftlab.tasks.causal_lm import CausalLM
from ftlab.tasks.classification import SequenceClassification
from ftlab.tasks.distillation import Distillation
from ftlab.tasks.domain_adaptation import DomainAdaptation
from ftlab.tasks.preference import Preference
from ftlab.tasks.seq2seq import Seq2Seq
from ftlab.tasks.token_classification import TokenClassification

__all__ = ["CausalLM", "Distillation", "DomainAdaptation", "Preference", "Seq2Seq", "SequenceClassification", "Task",
           "TokenClassification"]
