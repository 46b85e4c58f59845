"""ICM-LoRA: generate LoRA adapters from task examples with a conditional VAE.

- :mod:`.flatten`: adapters as flat vectors, per-tensor normalization with an exact round trip.
- :mod:`.trajectories`: per task, the last checkpoints of training (rank 2 on q/v by default).
- :mod:`.condition`: examples files and the task vector (the base model's in-context vector).
- :mod:`.cvae`: the 1-D convolutional CVAE.
- :mod:`.generator`: training, generation, safetensors files.
- :mod:`.pipeline`: the default SmolLM2 task split and :func:`ensure_generator`.
"""
from .condition import TaskExamples, load_examples, task_vector
from .cvae import AdapterCVAE, CVAEConfig
from .flatten import AdapterLayout, Normalizer, flatten_adapter, unflatten_adapter
from .generator import AdapterGenerator, GeneratorTrainConfig
from .pipeline import HELDOUT, SEEN, condition_vectors, default_generator_path, ensure_generator
from .trajectories import Trajectory, TrajectoryConfig, ensure_trajectories, load_trajectory, train_trajectory

__all__ = ["AdapterCVAE", "AdapterGenerator", "AdapterLayout", "CVAEConfig", "GeneratorTrainConfig", "HELDOUT",
           "Normalizer", "SEEN", "TaskExamples", "Trajectory", "TrajectoryConfig", "condition_vectors",
           "default_generator_path", "ensure_generator", "ensure_trajectories", "flatten_adapter",
           "load_examples", "load_trajectory", "task_vector", "train_trajectory", "unflatten_adapter"]
