"""`--config F.toml` (or `.yaml`) for `train` and `queue add`: every option by its long name, the
command line overriding the file, and `--print-config` writing the resolved options back as
TOML that `--config` reads.

The file's values become click's default_map for the command, so each is converted and checked
exactly as the same option on the command line is (a wrong type is click's one-line error naming
the option), and a run counts them as given by the user (a resumed run compares them with its
record as it compares command-line options).  Relative `data` and `ledger` paths are taken from
the config file's folder, so a folder holding config and data can be moved or shared."""

from __future__ import annotations

import json
import math
from pathlib import Path

#: options that a config file does not set (what the file is, and what to do with it)
NOT_IN_FILE = {"config", "print_config", "help"}
PATH_KEYS = ("data", "ledger")


def _long_names(command) -> dict[str, str]:
    """Long option name (with '-' or '_') -> the parameter's name, for every option of command."""
    out = {}
    for p in command.params:
        if p.name in NOT_IN_FILE or not getattr(p, "opts", None):
            continue
        for opt in p.opts:
            if opt.startswith("--"):
                key = opt[2:]
                out[key] = out[key.replace("-", "_")] = p.name
        out[p.name] = p.name
    return out


def read_config(path: Path) -> dict:
    """The file's table of options (ValueError naming the file and what is wrong)."""
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".yaml", ".yml"):
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path}: not TOML ({e}); a .yaml file is read as YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table of options (name = value), got {type(data).__name__}")
    return data


def default_map(command, path: Path) -> dict:
    """The config file as click's default_map: long names to parameter names, paths from the
    file's folder, unknown names refused with the known ones."""
    names = _long_names(command)
    out = {}
    for key, value in read_config(path).items():
        name = names.get(str(key))
        if name is None:
            known = sorted({k for k in names if "_" not in k})
            raise ValueError(f"--config {path}: {key!r} is not an option of this command (options: {', '.join(known)})")
        multiple = any(getattr(p, "multiple", False) for p in command.params if p.name == name)
        if isinstance(value, dict) or (isinstance(value, list) and not multiple):
            raise ValueError(f"--config {path}: {key} must be a single value, got {type(value).__name__}")
        if multiple and not isinstance(value, list):
            value = [value]  # reward = "m:f" for one
        if name in PATH_KEYS and isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            value = str((path.parent / value).resolve())
        out[name] = value
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string is a JSON string


def to_toml(command, options: dict, header: str) -> str:
    """options (parameter name -> value; None left out) as a TOML file --config reads back, each
    by the long name of command's option."""
    long = {}
    for p in command.params:
        opts = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        if opts:
            long[p.name] = opts[0][2:]
    lines = [f"# {line}" for line in header.splitlines()]
    for k in long:  # in the command's order, whatever order they were resolved in
        v = options.get(k)
        if v is None or k in NOT_IN_FILE or v == []:
            continue
        lines.append(f"{long[k]} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
