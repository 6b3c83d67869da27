"""What a run opens before it trains, and the checks that refuse it early, each one line: the
model (accepted by the validator, with tensors to train), the task and its data, the driver with
every prompt tokenized.  The session, a peer worker and a Ray actor open a run through these."""

from __future__ import annotations

import json
from pathlib import Path

from qes_edge.native.quant import QESError
from qes_edge.training.config import TrainConfig


class SessionError(Exception):
    """A problem with the user's input (options, files, ledger, model): one line, nothing written."""


# -- the checks ------------------------------------------------------------

def trainable_model(model, frozen) -> Path:
    """The model's path once our validator accepted it and it has tensors to train."""
    from qes_edge.gguf.model import GGUFModel, trainable_infos
    from qes_edge.gguf.models import ModelNotFound, resolve_model
    try:
        path = resolve_model(model)
        m = GGUFModel(path)
    except (ModelNotFound, QESError) as e:
        raise SessionError(str(e)) from None
    try:
        planned = trainable_infos(m.header.tensors, tuple(frozen))
    except QESError as e:
        raise SessionError(f"{path}: {e}") from None
    if not planned:
        types = ", ".join(sorted(m.summary()))
        raise SessionError(f"{path}: no tensor qes-edge can train (the file holds {types}; "
                           "quantize it to Q4_0..Q8_0 or a K-quant first)")
    return path


def data_sha256(path: str | Path, split: str) -> str:
    """What a run's data is recorded by (`data_sha256` in its config): the file's sha256, or for a
    data folder (tasks/data.py) the sha256 of the files training reads, by name: train.jsonl, and
    valid.jsonl when the run holds it out."""
    import hashlib
    from qes_edge.gguf.model import file_sha256
    from qes_edge.tasks.data import data_files
    files = data_files(path)
    if not files.folder:
        return file_sha256(files.train)
    h = hashlib.sha256()
    for f in [files.train] + ([files.valid] if split == "valid" and files.valid else []):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def check_recorded_data(recorded: dict, ledger_path: Path) -> None:
    """The run's data (a file, or a folder's train.jsonl and held-out valid.jsonl) must still be
    there and hold the bytes it was recorded with."""
    data, want = recorded.get("data"), recorded.get("data_sha256")
    if not data:
        return
    p = Path(data)
    if not p.exists():
        raise SessionError(f"{ledger_path}: the run's data file {p} is missing (it was recorded by absolute path)")
    try:
        got = data_sha256(p, recorded.get("split", "fixed"))
    except ValueError as e:
        raise SessionError(f"{ledger_path}: the run's data: {e}") from None
    if want and got != want:
        raise SessionError(f"{ledger_path}: the run's data {p} changed since the run was recorded (sha256 "
                           f"{want[:16]}… then): restore it, or start a new run with --new-run")


#: bytes a data line may hold besides its prompt (answers, choices, the user's own columns)
DATA_LINE_SLACK = 1 << 20


def data_line_limit(model_path: Path | None, n_ctx: int) -> int | None:
    """The longest data line worth reading for a model with an n_ctx context: JSON writes a
    character in at most 6 bytes (a \\uXXXX escape per UTF-8 byte at worst), so a line longer than
    6 × the prompt byte limit (gguf_check.prompt_byte_limit) + DATA_LINE_SLACK holds a prompt
    that cannot fit.  None where the model has no token list (no bound known)."""
    if model_path is None:
        return None
    from qes_edge.gguf.check import GGUFInvalid, check_gguf, prompt_byte_limit
    try:
        limit = prompt_byte_limit(check_gguf(model_path), -(-n_ctx // 256) * 256)  # llama.cpp pads to 256
    except GGUFInvalid:
        return None  # the model itself is refused where it is opened
    return None if limit is None else 6 * limit + DATA_LINE_SLACK


def load_task(cfg: TrainConfig, model_path: Path | None = None):
    """The run's task; with model_path, data lines too long for that model's context are refused
    as they are read."""
    from qes_edge.tasks import task_from_config
    try:
        return task_from_config(cfg, data_line_limit(model_path, cfg.n_ctx))
    except (ValueError, QESError) as e:
        raise SessionError(str(e)) from None


def open_driver(path: Path, n_ctx: int, threads: int, frozen=None, gpu_layers: int = 0):
    """gpu_layers: layers llama.cpp offloads (-1: all), each weight edited where it lives."""
    from qes_edge.llama.driver import ModelDriver, SelfCheckFailed
    from qes_edge.gguf.model import DEFAULT_FROZEN
    try:
        return ModelDriver(path, n_ctx=n_ctx, n_threads=threads, frozen=tuple(frozen or DEFAULT_FROZEN),
                           gpu_layers=gpu_layers)
    except (ValueError, QESError, RuntimeError, SelfCheckFailed) as e:
        raise SessionError(f"{path}: {e}") from None


def check_prompts(driver, task) -> None:
    """Every prompt rendered through the model's template and tokenized before any ledger row: a
    missing or failing template, or a prompt longer than the context, is refused up front."""
    try:
        driver.check_prompts(list(task.train_examples()) + list(task.heldout_examples()) + list(task.test_examples()))
    except (ValueError, QESError, RuntimeError) as e:
        raise SessionError(f"{driver.path}: {e}") from None


def prepare_driver(driver, task, cfg) -> None:
    """check_prompts, then the run's evaluation layout (cfg.eval_batch...): a batched one sizes
    the KV cache from the task's real prompts (driver.use_layout)."""
    check_prompts(driver, task)
    try:
        import dataclasses  # one sequence a prompt for a task without branches: a smaller output buffer
        layout = dataclasses.replace(cfg.eval_layout(), seqs_per_prompt=1 + task.branches_per_prompt())
        driver.use_layout(layout, list(task.train_examples()) + list(task.heldout_examples())
                          + list(task.test_examples()),
                          generated=task.generated_tokens())
    except (ValueError, RuntimeError) as e:
        raise SessionError(f"{driver.path}: the evaluation layout: {e}") from None


def check_data_option(data) -> Path | None:
    if data is None:
        return None
    data = Path(data).expanduser().absolute()  # stored in the run: resumable from any folder
    from qes_edge.tasks.data import data_files
    try:
        data_files(data)  # a JSONL file, or a folder with train.jsonl (tasks/data.py)
    except ValueError as e:
        raise SessionError(str(e)) from None
    return data


def differences(asked: dict, recorded: dict, names) -> list[str]:
    return [f"{k} {asked.get(k)!r} (the run has {recorded.get(k)!r})" for k in names if asked.get(k) != recorded.get(k)]


def model_opener(model: str | None, threads: int, gpu_layers: int = 0):
    """How a worker opens a run: the model checked against the run's base sha256, the task from
    the run's recorded config, every prompt tokenized; gpu_layers: the layers it offloads (the
    opener carries it: the handshake compares it with the coordinator's)."""
    from qes_edge.gguf.model import file_sha256
    from qes_edge.threads import resolve_threads
    from qes_edge.training.config import TrainConfig
    n_threads = resolve_threads(threads)
    cache: dict = {}

    def opener(info: dict):
        cfg = TrainConfig.from_record(json.loads(info["config"]))
        path = trainable_model(model, cfg.frozen)
        sha = cache.get(("sha", path)) or file_sha256(path)
        cache[("sha", path)] = sha
        if sha != info["base_sha256"]:
            raise ValueError(f"the run's base model is {info['base_name']} (sha256 {info['base_sha256'][:16]}…), "
                             f"this worker's --model is {path.name} ({sha[:16]}…)")
        task = load_task(cfg, path)
        driver = open_driver(path, cfg.n_ctx, n_threads, cfg.frozen, gpu_layers)  # a run starts from the base's codes
        prepare_driver(driver, task, cfg)
        return driver, task, n_threads
    opener.gpu_layers = gpu_layers
    return opener
