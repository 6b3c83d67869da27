import os
import sys
from pathlib import Path

# libqes's stand-in device (host memory behind the device interface: qes.h) joins the tests'
# comparisons of backends and the placement tests, where no GPU is
os.environ.setdefault("QES_EDGE_STANDIN_DEVICE", "1")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # reference.py, helpers
sys.path.append(str(ROOT))               # models/ (the requantize helper)


from qes_edge.native.quant import TRAINABLE, type_info  # noqa: E402

TYPE_NAMES = [t.name for t in TRAINABLE]


@pytest.fixture(scope="session")
def default_model():
    from qes_edge.gguf.models import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def model_of_type(default_model):
    """Path of a real GGUF holding tensors of the given type (the default model requantized)."""
    cache = {}

    def get(name: str) -> Path:
        if name == "Q4_1":
            return default_model
        if name not in cache:
            from models.requantize import requantize
            cache[name] = requantize(default_model, name)
        return cache[name]

    return get


def random_blocks(qtype, n_blocks: int, rng: np.random.Generator, extreme: float = 0.0):
    """Random bytes for n_blocks blocks of qtype, with a fraction of codes pushed to the range ends.
    Returns (bytes array, n_elements)."""
    from qes_edge.native.engine import CodeTensor

    info = type_info(qtype)
    data = rng.integers(0, 256, size=n_blocks * info.block_bytes, dtype=np.uint8)
    n = n_blocks * info.block_elems
    if extreme:
        t = CodeTensor("scratch", qtype, n, data)
        codes = t.codes()
        pick = rng.random(n) < extreme
        codes[pick] = np.where(rng.random(pick.sum()) < 0.5, info.cmin, info.cmax)
        t.set_codes(codes)
    return data, n


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a real disk that fills up (needs root and mount, as on the dev and CI
    machines; skipped with the reason where the kernel refuses)."""
    import subprocess
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(disk: Path) -> Path:
    """Fill the disk to the last byte (unbuffered writes until ENOSPC); returns the filler."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


@pytest.fixture(scope="session")
def tiny_choice_data(tmp_path_factory) -> Path:
    """A folder with bigger.jsonl, a 10-question choice task (8 train, 2 held out) for runs on the
    real model that must be quick, and sys/, a sysfs with no battery and no thermal zone (a
    daemon given it as QES_EDGE_SYSFS never pauses)."""
    import json
    d = tmp_path_factory.mktemp("data")
    pairs = [(3, 7), (12, 5), (8, 9), (40, 14), (2, 20), (33, 31), (17, 71), (6, 60), (90, 19), (11, 13)]
    rows = [{"prompt": f"Which number is bigger, {a} or {b}?", "choices": [str(a), str(b)], "answer": int(b > a)}
            for a, b in pairs]
    (d / "bigger.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "sys").mkdir()
    return d


def recorded_steps(ledger: Path) -> list[tuple]:
    """A verified ledger's latest run, a tuple per step: (seeds, Q16 coefficients, reward bytes,
    weights sha256, failures, row hash).  The first five are the training; the row hash also
    covers the timings, which differ between any two runs."""
    from qes_edge.ledger.store import Ledger
    lg = Ledger(ledger, readonly=True)
    try:
        run = lg.run()
        lg.verify(run.run_id)
        return [(r.seeds.tolist(), r.coefs_q16.tolist(), r.rewards.tobytes(), r.weights_sha256, r.failures, r.hash)
                for r in lg.steps(run.run_id)]
    finally:
        lg.close()


@pytest.fixture(autouse=True)
def qes_edge_home(tmp_path_factory, monkeypatch):
    """Every test gets its own QES_EDGE_HOME: nothing is written to the user's data folder."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("QES_EDGE_HOME", str(home))
    return home
