"""ICM-LoRA: generate LoRA adapters from task examples with a conditional VAE.

- :mod:`.flatten`: adapters as flat vectors, per-tensor normalization with an exact round trip.
- :mod:`.trajectories`: per task, the last checkpoints of training (rank 2 on q/v by default).
- :mod:`.condition`: examples files and the task vector (the base model's in-context vector).
- :mod:`.projection`: the task vector projected by LDA onto coordinates that tell tasks apart.
- :mod:`.basis`: the output space, a mean adapter plus principal directions stored low-bit.
- :mod:`.cvae`: the CVAE over the adapter's coefficients in that basis.
- :mod:`.generator`: training, generation, safetensors files.
- :mod:`.finetune`: the second training stage, the decoder trained on the tasks' own loss.
- :mod:`.pipeline`: the default SmolLM2 task split and :func:`ensure_generator`.
"""
from .basis import AdapterBasis
from .condition import TaskExamples, load_examples, task_vector
from .cvae import AdapterCVAE, CVAEConfig
from .flatten import AdapterLayout, Normalizer, flatten_adapter, unflatten_adapter
from .generator import AdapterGenerator, GeneratorTrainConfig
from .projection import ConditionProjection
from .pipeline import HELDOUT, SEEN, condition_vectors, default_generator_path, ensure_generator
from .trajectories import Trajectory, TrajectoryConfig, ensure_trajectories, load_trajectory, train_trajectory

__all__ = ["AdapterBasis", "AdapterCVAE", "AdapterGenerator", "AdapterLayout", "CVAEConfig", "ConditionProjection",
           "GeneratorTrainConfig", "HELDOUT", "Normalizer", "SEEN", "TaskExamples", "Trajectory", "TrajectoryConfig",
           "condition_vectors", "default_generator_path", "ensure_generator", "ensure_trajectories",
           "flatten_adapter", "load_examples", "load_trajectory", "task_vector", "train_trajectory",
           "unflatten_adapter"]
