"""Training LoRA adapters for the suite: generated tasks and a small trainer."""
from .tasks import HARD_SUITE, SUITE, Task, add_constant, caesar, get_task, sub_constant, task_names, to_base
from .trainer import (DEFAULT_TARGETS, TrainConfig, answer_nll, exact_match, peft_config, train_lm_adapter,
                      train_mixture_adapter, train_task_adapter)
from .mola import MoLATrainConfig, TrainableMoLA, train_mola_adapter

__all__ = ["DEFAULT_TARGETS", "HARD_SUITE", "MoLATrainConfig", "SUITE", "TrainableMoLA", "Task", "TrainConfig", "add_constant", "answer_nll", "caesar", "exact_match", "get_task",
           "peft_config", "sub_constant", "task_names", "to_base", "train_lm_adapter", "train_mixture_adapter",
           "train_mola_adapter", "train_task_adapter"]
