"""Models by the names users have: ollama names, LM Studio files, Hugging Face cache entries,
each read from a small fake store built here (manifest + blob, folders) around the test model;
nothing is downloaded, and a name that is not there says where it looked."""

import json
import os
import subprocess
import sys

import pytest

from qes_edge.gguf.models import ModelNotFound, resolve_model

DIGEST = "ab" * 32


def ollama_store(root, model, name=("library", "smollm2", "135m"), digest=DIGEST, blob=True, media=None):
    manifest = root / "manifests" / "registry.ollama.ai" / name[0] / name[1] / name[2]
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": media or "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32, "size": 1}]}))
    (root / "blobs").mkdir(exist_ok=True)
    if blob:
        os.symlink(model, root / "blobs" / f"sha256-{digest}")
    return root


def test_ollama_names(tmp_path, default_model, monkeypatch):
    store = ollama_store(tmp_path / "ollama", default_model)
    ollama_store(store, default_model, name=("someone", "tuned", "latest"), digest="ef" * 32)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    for name in ("smollm2:135m", "ollama:smollm2:135m"):
        assert resolve_model(name) == store / "blobs" / f"sha256-{DIGEST}"
    assert resolve_model("someone/tuned") == store / "blobs" / f"sha256-{'ef' * 32}"  # tag latest
    with pytest.raises(ModelNotFound, match=r"smollm2:360m is not in the local store \(looked for .*smollm2/360m"):
        resolve_model("smollm2:360m")


def test_ollama_manifest_without_its_blob(tmp_path, default_model, monkeypatch):
    store = ollama_store(tmp_path / "o", default_model, blob=False)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    with pytest.raises(ModelNotFound, match=r"points to the blob .*sha256-abab.* which is missing"):
        resolve_model("smollm2:135m")
    (store / "manifests/registry.ollama.ai/library/smollm2/135m").write_text("{not json")
    with pytest.raises(ModelNotFound, match="cannot be read"):
        resolve_model("smollm2:135m")


def test_lmstudio_files(tmp_path, default_model, monkeypatch):
    root = tmp_path / "lms"
    d = root / "lmstudio-community" / "SmolLM2-135M-Instruct-GGUF"
    d.mkdir(parents=True)
    os.symlink(default_model, d / "smol.Q4_1.gguf")
    monkeypatch.setenv("LMSTUDIO_MODELS", str(root))
    assert resolve_model("lmstudio:lmstudio-community/SmolLM2-135M-Instruct-GGUF/smol.Q4_1.gguf") == d / "smol.Q4_1.gguf"
    assert resolve_model("lmstudio:smol.Q4_1.gguf") == d / "smol.Q4_1.gguf"
    with pytest.raises(ModelNotFound, match="is not in"):
        resolve_model("lmstudio:other.gguf")
    with pytest.raises(ModelNotFound, match="is not in"):
        resolve_model("lmstudio:../../etc/passwd")
    d2 = root / "x" / "y"
    d2.mkdir(parents=True)
    os.symlink(default_model, d2 / "smol.Q4_1.gguf")
    with pytest.raises(ModelNotFound, match="ambiguous"):
        resolve_model("lmstudio:smol.Q4_1.gguf")


def test_hugging_face_cache(tmp_path, default_model, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF" / "snapshots" / ("1" * 40)
    snap.mkdir(parents=True)
    os.symlink(default_model, snap / "smol.gguf")
    ref = cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF" / "refs"
    ref.mkdir()
    (ref / "main").write_text("1" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smol.gguf") == snap / "smol.gguf"
    with pytest.raises(ModelNotFound, match="is not in the Hugging Face cache"):
        resolve_model("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:other.gguf")
    with pytest.raises(ModelNotFound, match="expected hf:org/repo:file.gguf"):
        resolve_model("hf:justonepart")


def test_paths_and_directories(tmp_path, default_model):
    assert resolve_model(str(default_model)) == default_model
    with pytest.raises(ModelNotFound, match="is a directory"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFound, match="model file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_info_by_ollama_name(tmp_path, default_model):
    store = ollama_store(tmp_path / "ollama", default_model)
    env = {**os.environ, "OLLAMA_MODELS": str(store), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "qes_edge", "info", "--model", "smollm2:135m"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "106,168,320 codes" in r.stdout
    r = subprocess.run([sys.executable, "-m", "qes_edge", "info", "--model", "nothere:1b"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not in the local store" in r.stderr
