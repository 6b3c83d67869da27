"""Every backend of the registry that this machine can run, byte for byte against portable.

Each operation runs through `engine.on_backend(name, tensors, copy=True)`: the bytes go into
the backend's own memory (qes_backend_alloc/upload), the operation runs there, and they come
back (download), exactly as a device backend (cuda, metal) is driven; host backends take the
same path.  Compared: the golden vectors (perturb/restore, update with seed replay and stored
residual, the weights digest), random tensors of every type with codes at the range ends, a
group of tensors perturbed in one call, and the digest of libqes against hashlib."""

import numpy as np
import pytest

import make_golden as M
from qes_edge.native import binding as _native
from qes_edge.native.engine import CodeTensor, Step, TensorGroup, digest_tensors, on_backend
from qes_edge.native.quant import QT, QESError, type_info
from test_golden import GOLDEN, input_bytes, residual_of, sha, steps_of, tensor

BACKENDS = _native.available_backends(include_device=True)
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def test_the_registry_is_the_one_list():
    rows = _native.backends()
    assert [r["name"] for r in rows] == list(_native.BACKENDS) == ["portable", "avx2", "neon", "cuda", "metal",
                                                                               "standin"]
    assert [r["id"] for r in rows] == list(range(len(rows)))
    assert all(r["compiled"] for r in rows if r["available"])
    assert [r["name"] for r in rows if r["device"]] == ["cuda", "metal", "standin"]
    assert "portable" in BACKENDS and _native.get_backend() in BACKENDS
    for r in rows:
        if not r["available"]:
            with pytest.raises(RuntimeError, match=f"backend '{r['name']}' is (not compiled|compiled in but not usable)"):
                _native.set_backend(r["name"])
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        _native.set_backend("tpu")
    assert _native.set_backend("auto") == _native.get_backend() and not _native.is_device(_native.get_backend())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GOLDEN["perturb"], ids=lambda c: f"{c['type']}:{c['seed']}")
def test_golden_perturb_restore(case, backend):
    data = input_bytes(case)
    original = data.copy()
    t = tensor(case, data)
    with on_backend(backend, [t], copy=True):
        p = t.perturb(case["seed"], case["p32"])
        with pytest.raises(QESError, match="on the host"):
            t.codes()
    assert p.mask.tobytes().hex() == case["mask"] and p.applied == case["applied"]
    assert sha(data) == case["bytes_after_sha256"]
    with on_backend(backend, [t], copy=True):
        t.restore(p)
    assert np.array_equal(data, original)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GOLDEN["update"], ids=lambda c: f"{c['type']}:{c['mode']}")
def test_golden_update(case, backend):
    data = input_bytes(case)
    r = residual_of(case)
    t = tensor(case, data)
    with on_backend(backend, [t], copy=True):
        stats = t.update(steps_of(case), r, beta=case["beta"], clamp_q16=case["clamp_q16"],
                         anti_windup=case["anti_windup"])
    assert sha(data) == case["bytes_after_sha256"]
    assert (stats.changed, stats.dropped) == (case["changed"], case["dropped"])
    if r is not None:
        assert M.res_sha(r) == case["residual_after_sha256"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_digest(backend):
    g = GOLDEN["digest"]
    tensors = [CodeTensor(row["tensor"], QT[row["type"]], row["n_elements"],
                          np.frombuffer(bytes.fromhex(row["bytes"]), np.uint8).copy()) for row in g["tensors"]]
    with on_backend(backend, tensors, copy=True):
        assert digest_tensors(tensors) == g["sha256"]
    assert digest_tensors(tensors, native=True) == digest_tensors(tensors) == g["sha256"]


def random_tensors(rng, n=4):
    out = []
    for i in range(n):
        qt = QT[TYPES[rng.integers(len(TYPES))]]
        blocks = int(rng.integers(60, 200))
        info = type_info(qt, "x")
        data = rng.integers(0, 256, blocks * info.block_bytes, dtype=np.uint8)
        t = CodeTensor(f"blk.{i}.ffn_down.weight", qt, blocks * info.block_elems, data)
        codes = t.codes()
        codes[::5] = info.cmax
        codes[1::5] = info.cmin
        t.set_codes(codes)
        out.append(t)
    return out


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "portable"])
def test_random_tensors_against_portable(backend):
    rng = np.random.default_rng(7)
    ref = random_tensors(rng)
    rng = np.random.default_rng(7)
    mine = random_tensors(rng)
    steps = [Step(np.array([s, -s, s + 1, -(s + 1)]), np.array([90000, -30000, 70000, 20000]), 34268880 * 2)
             for s in (11, 523, 77777)]
    for group_threads in (1, 2):
        got = []
        for ts, name in ((ref, "portable"), (mine, backend)):
            with on_backend(name, ts, copy=True):
                g = TensorGroup(ts, threads=group_threads)
                p = g.perturb(-1234567, 34268880 * 4)
                got.append(([m.tobytes() for m in p.masks], list(p.applied), [t._array.tobytes() for t in ts]))
                g.restore(p)
        assert got[0] == got[1]
    for residual in (False, True):
        outs = []
        for ts, name in ((ref, "portable"), (mine, backend)):
            rs = [np.zeros(t.n_elements, np.int32) if residual else None for t in ts]
            with on_backend(name, ts, copy=True):
                stats = [t.update(steps, r, threads=2) for t, r in zip(ts, rs)]
            outs.append(([t._array.tobytes() for t in ts], [(s.changed, s.dropped) for s in stats],
                         [r.tobytes() if r is not None else None for r in rs]))
        assert outs[0] == outs[1] and sum(c for c, _ in outs[0][1]) > 0
    assert digest_tensors(ref) == digest_tensors(mine)
