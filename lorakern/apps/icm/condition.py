"""The generator's condition: a task vector read by the base model from a few task examples.

ICM-LoRA's "in-context vector": the base model reads each example (instruction,
input and output, in the prompt format of :mod:`lorakern.apps.train.tasks`), and the
last layer's hidden state at the last token, averaged over the examples, stands
for the task.

An examples file is JSON::

    {"instruction": "Encode the letters.",
     "examples": [{"input": "a b c", "output": "d e f"}, ...]}

(``examples`` may also hold ``[input, output]`` pairs). It is validated fully
before the model runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TaskExamples", "example_text", "load_examples", "task_vector"]

MAX_EXAMPLES = 256
MAX_FILE_BYTES = 1 << 20
MAX_FIELD_CHARS = 2000


@dataclass(frozen=True)
class TaskExamples:
    """A task shown by examples: the prompt's instruction line and ``(input, output)`` pairs."""

    instruction: str
    examples: tuple[tuple[str, str], ...]

    def __post_init__(self):
        if not isinstance(self.instruction, str) or not self.instruction.strip() or "\n" in self.instruction:
            raise ValueError("instruction must be one non-empty line of text")
        if not 1 <= len(self.examples) <= MAX_EXAMPLES:
            raise ValueError(f"need 1 to {MAX_EXAMPLES} examples, got {len(self.examples)}")
        for i, ex in enumerate(self.examples):
            if (not isinstance(ex, tuple) or len(ex) != 2 or not all(isinstance(s, str) for s in ex)
                    or not all(s.strip() for s in ex)):
                raise ValueError(f"example {i}: expected a pair of non-empty strings, got {ex!r:.80}")
            if any(len(s) > MAX_FIELD_CHARS or "\n" in s for s in ex):
                raise ValueError(f"example {i}: input and output must be single lines of at most "
                                 f"{MAX_FIELD_CHARS} characters")

    @classmethod
    def of_task(cls, task, n: int, seed: int) -> "TaskExamples":
        """``n`` examples of a :class:`~lorakern.apps.train.Task` drawn with ``seed``."""
        return cls(task.instruction, tuple(task.examples(n, seed)))

    def to_json(self) -> str:
        return json.dumps({"instruction": self.instruction,
                           "examples": [{"input": x, "output": y} for x, y in self.examples]}, indent=1)


def load_examples(path: str | os.PathLike) -> TaskExamples:
    """Read and validate an examples file (see the module docstring); raises ValueError on anything malformed."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such examples file")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{p}: examples file is larger than {MAX_FILE_BYTES} bytes")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "instruction" not in data or "examples" not in data:
        raise ValueError(f"{p}: expected an object with 'instruction' and 'examples'")
    exs = data["examples"]
    if not isinstance(exs, list):
        raise ValueError(f"{p}: 'examples' must be a list")
    pairs = []
    for i, ex in enumerate(exs):
        if isinstance(ex, dict) and set(ex) >= {"input", "output"}:
            pairs.append((ex["input"], ex["output"]))
        elif isinstance(ex, list) and len(ex) == 2:
            pairs.append(tuple(ex))
        else:
            raise ValueError(f"{p}: example {i} must be {{'input': ..., 'output': ...}} or [input, output]")
    try:
        return TaskExamples(data["instruction"], tuple(pairs))
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


def example_text(instruction: str, x: str, y: str) -> str:
    """One example as the base model reads it (the trainer's prompt followed by the answer)."""
    return f"{instruction}\nInput: {x}\nOutput: {y}"


@torch.no_grad()
def task_vector(model, tokenizer, examples: TaskExamples, batch_size: int = 16) -> torch.Tensor:
    """The task vector (float32 ``[hidden]``): the last layer's hidden state at each example's last token,
    averaged over the examples. Right padding keeps every last token's state independent of the padding."""
    texts = [example_text(examples.instruction, x, y) for x, y in examples.examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    total = None
    try:
        for i in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts[i:i + batch_size]]
            L = max(map(len, ids))
            inp = torch.tensor([s + [pad] * (L - len(s)) for s in ids])
            mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in ids])
            hidden = model(input_ids=inp, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            last = hidden[torch.arange(len(ids)), torch.tensor([len(s) - 1 for s in ids])].float().sum(0)
            total = last if total is None else total + last
    finally:
        model.train(was_training)
    return total / len(texts)
