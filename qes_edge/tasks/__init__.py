"""Tasks: where prompts come from and how a model's behaviour is turned into a reward.

Built in: `sentiment` (multiple choice by logits: the fast path on CPUs), `choice` (multiple choice
from the user's JSONL, by logits), `countdown` (the
paper's arithmetic game, generated), `jsonl` (exact or regex match against the user's JSONL).
Any `module:function` reward (prompt, completion, example) -> float works with `--data`.

Every prompt goes through the model's own chat template (llama/chat.py) unless the run asks for raw
prompts (`raw_prompt`)."""

from __future__ import annotations

from qes_edge.tasks.base import Example, Task
from qes_edge.tasks.registry import load_task, task_from_config

__all__ = ["Example", "Task", "load_task", "task_from_config"]
