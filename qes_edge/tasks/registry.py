"""The built-in tasks by name, and the task a run's config asks for."""

from __future__ import annotations

from qes_edge.tasks.base import Task, load_callable


def task_from_config(cfg, max_line_bytes: int | None = None) -> Task:
    """The task a run's config asks for (a TrainConfig, or anything with its fields): task, data,
    seed, raw_prompt, and choice_norm for `choice`.  max_line_bytes: the longest data line read
    (the tasks over a data file)."""
    kw = {"raw_prompt": bool(getattr(cfg, "raw_prompt", False))}
    if cfg.data and max_line_bytes and cfg.task not in ("sentiment", "countdown"):
        kw["max_line_bytes"] = max_line_bytes
    if cfg.task == "choice":
        kw["choice_norm"] = getattr(cfg, "choice_norm", "mean")
    if cfg.data and cfg.task not in ("sentiment", "countdown"):
        kw["split"] = getattr(cfg, "split", "fixed")
    if getattr(cfg, "rewards", None):  # --reward a:f --reward b:g=0.5 (tasks/rewards.py)
        from qes_edge.tasks.jsonl import CallableRewardTask
        from qes_edge.tasks.rewards import load_rewards
        if not cfg.data:
            raise ValueError("--reward needs --data with the prompts")
        return CallableRewardTask(load_rewards(cfg.rewards), cfg.data, seed=cfg.seed, **kw)
    return load_task(cfg.task, cfg.data, cfg.seed, **kw)


def load_task(spec: str, data: str | None = None, seed: int = 0, **kw) -> Task:
    """kw: options of the task (raw_prompt for every task; choice_norm for choice)."""
    if spec == "sentiment":
        from qes_edge.tasks.sentiment import SentimentTask
        return SentimentTask(seed=seed, **kw)
    if spec == "countdown":
        from qes_edge.tasks.countdown import CountdownTask
        return CountdownTask(seed=seed, **kw)
    if spec == "jsonl":
        from qes_edge.tasks.jsonl import JsonlTask
        if not data:
            raise ValueError("--task jsonl needs --data FILE.jsonl")
        return JsonlTask(data, seed=seed, **kw)
    if spec == "choice":
        from qes_edge.tasks.jsonl import ChoiceTask
        if not data:
            raise ValueError("--task choice needs --data FILE.jsonl with prompt, choices and answer")
        return ChoiceTask(data, seed=seed, **kw)
    if ":" in spec:
        from qes_edge.tasks.jsonl import CallableRewardTask
        if not data:
            raise ValueError(f"--task {spec} needs --data FILE.jsonl with the prompts")
        return CallableRewardTask(load_callable(spec), data, seed=seed, **kw)
    raise ValueError(f"unknown task {spec!r}: use sentiment, countdown, jsonl, choice or module:function")
