"""Weights that llama.cpp offloads to a GPU (issue 25), tested where no GPU is: libqes's stand-in
device (host memory behind the device interface, QES_EDGE_STANDIN_DEVICE=1: conftest sets it)
holds the "offloaded" tensors, so the placement logic, the split of a step between host and
device tensors, the digest read where the bytes are and the start-up self-check on a placement
run for real; what a GPU alone can show is scripts/test_gpu.sh's."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qes_edge.llama.placement import ALL_LAYERS, device_of, parse_gpu_layers, summary
from qes_edge.llama.weights import Weight
from qes_edge.native import binding as _native
from qes_edge.native.binding import ffi, lib
from qes_edge.native.engine import CodeTensor, Step, TensorGroup, digest_tensors, on_backend, sigma_threshold
from qes_edge.native.quant import QT, QESError, TRAINABLE, type_info
from conftest import random_blocks

STANDIN = _native.BACKENDS["standin"]


# -- the placement logic -----------------------------------------------------------------------

def test_gpu_layers_parse_as_llama_cpp_counts_them():
    assert parse_gpu_layers("all") == parse_gpu_layers("ALL") == ALL_LAYERS == -1
    assert parse_gpu_layers("0") == 0 and parse_gpu_layers("12") == 12 and parse_gpu_layers(7) == 7
    for bad in ("x", "-3", "1.5", ""):
        with pytest.raises(ValueError, match="--gpu-layers"):
            parse_gpu_layers(bad)


def _w(name, buffer, host):
    return Weight(name, 3, 32, 20, 0x1000, host, buffer)


def test_a_weight_s_buffer_names_the_backend_that_edits_it():
    assert device_of(_w("blk.0.attn_q.weight", "CPU", True)) is None
    assert device_of(_w("blk.0.attn_q.weight", "CUDA_Host", True)) is None  # pinned host memory is host memory
    assert device_of(_w("blk.0.attn_q.weight", "CUDA0", False)) == "cuda"
    assert device_of(_w("blk.0.attn_q.weight", "CUDA1", False)) == "cuda"
    assert device_of(_w("blk.0.attn_q.weight", "Metal", False)) == "metal"
    with pytest.raises(QESError, match="Vulkan0 buffer: libqes has no backend"):
        device_of(_w("blk.0.attn_q.weight", "Vulkan0", False))


def test_a_device_tensor_without_its_backend_is_refused_clearly():
    if _native.lib.qes_backend_available(_native.BACKENDS["cuda"]):
        pytest.skip("a CUDA device is present here")
    with pytest.raises(QESError, match="lives in cuda memory, but libqes's cuda backend is not usable here"):
        CodeTensor("blk.0.attn_q.weight", QT.Q4_0, 32, address=0x1000, n_bytes=18, device="cuda")
    with pytest.raises(QESError, match="'portable' is not a device backend"):
        CodeTensor("t", QT.Q4_0, 32, address=0x1000, n_bytes=18, device="portable")


# -- the engine: a step split between host and device memory ------------------------------------

def _pair(tmp_rng, qtype, n_blocks, name):
    """The same random tensor twice: in host memory, and resident in the stand-in device's."""
    info = type_info(qtype)
    data, _ = random_blocks(qtype, n_blocks, tmp_rng, extreme=0.2)
    host = CodeTensor(name, info.qtype, n_blocks * info.block_elems, data.copy())
    p = lib.qes_backend_alloc(STANDIN, data.nbytes)
    assert p != ffi.NULL
    lib.qes_backend_upload(STANDIN, p, ffi.cast("uint8_t *", data.ctypes.data), data.nbytes)
    dev = CodeTensor(name, info.qtype, n_blocks * info.block_elems, address=int(ffi.cast("uintptr_t", p)),
                     n_bytes=data.nbytes, device="standin")
    return host, dev, p


@pytest.fixture
def mixed():
    """Six tensors of every trainable type, every other one on the device; and all-host copies."""
    rng = np.random.default_rng(7)
    hosts, placed, held = [], [], []
    for i, t in enumerate(TRAINABLE[:6]):
        h, d, p = _pair(rng, t, 8, f"blk.{i}.ffn_down.weight")
        hosts.append(h)
        copy = np.frombuffer(bytearray(h.read_bytes()), np.uint8)
        placed.append(d if i % 2 else CodeTensor(h.name, h.qtype, h.n_elements, copy))
        held.append(p)
    yield hosts, placed
    for p in held:
        lib.qes_backend_free(STANDIN, p)


def test_a_step_split_between_host_and_device_writes_the_bytes_of_an_all_host_step(mixed):
    hosts, placed = mixed
    assert summary(placed) == "3 in host memory, 3 in standin memory"
    assert [d for d, _, _ in TensorGroup(placed)._parts] == [None, STANDIN]  # one libqes call per memory
    assert "on standin" in repr(placed[1])
    assert digest_tensors(placed) == digest_tensors(hosts) == digest_tensors(hosts, native=True)
    p32 = sigma_threshold(0.05)
    gh, gp = TensorGroup(hosts, threads=2), TensorGroup(placed, threads=2)
    for seed in (5, -5, 123):
        a, b = gh.perturb(seed, p32), gp.perturb(seed, p32)
        assert a.applied.tolist() == b.applied.tolist() and a.applied.sum() > 0
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
        assert digest_tensors(placed) == digest_tensors(hosts)
        a.restore(), b.restore()
    rng = np.random.default_rng(3)
    steps = [Step(np.array([11, -11, 12, -12]), rng.integers(-90000, 90000, 4), p32) for _ in range(3)]
    for k in range(1, 4):
        for h, d in zip(hosts, placed):
            sh, sd = h.update(steps[:k], beta=0.9), d.update(steps[:k], beta=0.9)
            assert (sh.changed, sh.dropped) == (sd.changed, sd.dropped)
        assert digest_tensors(placed) == digest_tensors(hosts)
    for h, d in zip(hosts, placed):
        assert d.read_bytes() == h.read_bytes()
    # a stored residual goes where the codes are for the call and comes back
    rh, rd = np.zeros(hosts[1].n_elements, np.int32), np.zeros(hosts[1].n_elements, np.int32)
    hosts[1].update(steps, rh), placed[1].update(steps, rd)
    assert np.array_equal(rh, rd) and rh.any() and placed[1].read_bytes() == hosts[1].read_bytes()


def test_a_device_tensor_is_not_read_as_codes_nor_copied_elsewhere(mixed):
    _, placed = mixed
    with pytest.raises(QESError, match="in a device backend's memory"):
        placed[1].codes()
    with pytest.raises(QESError, match="lives in standin memory: it runs there, not on portable"):
        with on_backend("portable", placed, copy=True):
            pass
    assert _native.get_backend() != "standin"  # the process's host backend is left as it was


def test_the_device_path_fails_whole_and_leaves_the_host_tensors_as_they_were(mixed):
    hosts, placed = mixed
    before = [t.read_bytes() for t in placed]
    placed[1]._c.n_bytes += 1  # a device tensor the backend refuses (its size disagrees with its type)
    try:
        with pytest.raises(QESError, match="perturb"):
            TensorGroup(placed).perturb(9, sigma_threshold(0.05))
    finally:
        placed[1]._c.n_bytes -= 1
    assert [t.read_bytes() for t in placed] == before  # the host part done first was restored


# -- the real model: a run with offloaded layers is the run without -----------------------------

def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


@pytest.mark.slow
def test_a_run_with_its_last_layers_on_the_device_records_the_all_host_ledger(tmp_path, tiny_choice_data):
    """llama.cpp computes from its host buffer; the stand-in device edits the last 15 layers' tensors
    there through the device interface, as libqes's CUDA backend edits an offloaded layer.  The
    self-check passes on that placement and the ledger (rewards, weights hashes) is the all-host
    one, which `replay` on the host backend rebuilds."""
    from qes_edge.gguf.models import default_model_path
    from qes_edge.ledger.store import Ledger
    from qes_edge.llama.driver import ModelDriver
    from qes_edge.llama.weights import weight_code_tensors
    from qes_edge.training.config import TrainConfig
    from qes_edge.training.session import RUN_OPTIONS, Session, SessionOptions

    cfg = dict(task="choice", data=str(tiny_choice_data / "bigger.jsonl"), population=4, batch=2, n_ctx=128,
               sigma=0.02, alpha=0.004)
    rows = {}
    for placement in ("host", "split"):
        driver = ModelDriver(default_model_path(), n_ctx=128, n_threads=1, self_check=False)
        if placement == "split":
            names = [t.name for t in driver.tensors]
            driver.tensors = weight_code_tensors(driver.weights, names,
                                                 device_of=lambda w: "standin" if _layer(w.name) >= 15 else None)
            n_dev = sum(_layer(n) >= 15 for n in names)
            assert 0 < n_dev < len(names)
            assert summary(driver.tensors) == f"{len(names) - n_dev} in host memory, {n_dev} in standin memory"
        driver.self_check()  # perturb, logits move, restore, logits back: on each memory in use
        s = Session.open(SessionOptions(TrainConfig(**cfg), ledger=tmp_path / f"{placement}.qes", explicit=RUN_OPTIONS,
                                        threads=1), driver=driver)
        with s:
            for _ in range(3):
                s.train_step()
        lg = Ledger(tmp_path / f"{placement}.qes", readonly=True)
        run = lg.runs()[-1]
        rows[placement] = [(r.step, r.rewards.tobytes(), r.weights_sha256) for r in lg.steps(run.run_id)]
        lg.close()
    assert rows["split"] == rows["host"] and len(rows["host"]) == 3
    out = subprocess.run([sys.executable, "-m", "qes_edge", "replay", "--ledger", str(tmp_path / "split.qes"),
                          "--out", str(tmp_path / "r.gguf")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "every weights hash matched" in out.stdout + out.stderr
    # follow --gpu-layers: the host run's steps replayed with the last 10 layers' tensors held and
    # updated in the device's memory write the GGUF that replay wrote on the host
    from qes_edge.training.follow import Follower
    f = Follower(tmp_path / "host.qes", tmp_path / "f.gguf", gpu_layers=10, device="standin")
    b = f.advance()
    assert b.n_steps == 3 and sum(t.resident == "standin" for t in f.tensors) == \
        sum((_layer(t.name) >= 20) for t in f.tensors) > 0
    assert (tmp_path / "f.gguf").read_bytes() == (tmp_path / "r.gguf").read_bytes()


def test_the_layers_llama_cpp_offloads_are_its_last_ones():
    from qes_edge.llama.placement import planned_on_gpu
    names = [f"blk.{i}.attn_q.weight" for i in range(30)] + ["output.weight", "token_embd.weight"]
    on = lambda n: [x for x in names if planned_on_gpu(x, 30, n)]  # noqa: E731
    assert on(0) == []
    assert on(10) == [f"blk.{i}.attn_q.weight" for i in range(20, 30)]
    assert on(30) == names[:30]                          # every layer; the head stays (llama.cpp: n_layer + 1)
    assert on(31) == on(ALL_LAYERS) == names[:31]        # the head too; the embeddings never


def test_gpu_layers_on_a_cpu_only_llama_cpp_is_one_line_and_exit_2(tmp_path):
    from llama_cpp import llama_cpp as C
    if C.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp can offload")
    for cmd in (["train", "--steps", "1"], ["eval"], ["queue", "add", "--steps", "1"],
                ["worker", "--on", "socket://127.0.0.1:0", "--ledger", str(tmp_path / "w.qes")]):
        r = subprocess.run([sys.executable, "-m", "qes_edge", *cmd, "--gpu-layers", "all"], capture_output=True,
                           text=True, env={**__import__("os").environ, "QES_EDGE_HOME": str(tmp_path)})
        assert r.returncode == 2, (cmd, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "this llama.cpp was built for the CPU only" in lines[0], (cmd, r.stderr)
    assert not (tmp_path / "w.qes").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_synthetic_model_of_the_gpu_check_loads_and_its_edits_reach_the_forward_pass(tmp_path):
    """scripts/test_gpu.sh trains models/synthetic.py's GGUF (the default model does not travel to
    the GPU machine): llama.cpp loads it, the self-check passes (perturbing moves the logits,
    restoring brings them back bit for bit) and every trainable type of it is edited in place."""
    from models.synthetic import TYPES, write_synthetic
    from qes_edge.llama.driver import ModelDriver
    path = write_synthetic(tmp_path / "syn.gguf", n_layer=2, n_embd=128, n_ff=256)
    d = ModelDriver(path, n_ctx=128, n_threads=1)
    assert len(d.tensors) == 14 and {t.qtype.name for t in d.tensors} == set(TYPES)
    assert d.chat is None  # a base model without a template: trained with --raw-prompt
    assert np.isfinite(d.logits(d.tokenize("Is 7 bigger than 3? Answer:"))).all()
