"""The QES engine on one tensor's raw GGUF bytes: codes, noise, perturb/restore, update.

A :class:`CodeTensor` wraps memory that holds a tensor's blocks -- a NumPy array (a GGUF
file mapped or read into memory) or a raw address (a llama.cpp weight buffer) -- and edits
the integer codes in place through libqes.  Every failure is a :class:`QESError` that names
the tensor; nothing is written when an argument is rejected.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from qes_edge.native.binding import ffi, lib
from qes_edge.native.fixed_point import DEFAULT_CLAMP_Q16, beta_to_q14
from qes_edge.native.quant import QESError, TypeInfo, type_info, type_name

SEED_MAX = 2**31 - 1
SIGMA_MAX = 0.5


def _fail(tensor: str, qtype, err: int, what: str) -> QESError:
    reason = ffi.string(lib.qes_strerror(err)).decode()
    return QESError(f"tensor {tensor!r} ({type_name(qtype)}): {what}: {reason}")


def sigma_threshold(sigma: float) -> int:
    """p32 = floor(sigma*sqrt(2/pi)*2^32): the probability that a code moves, in 32-bit fixed point."""
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise QESError(f"sigma must be a number, got {sigma!r}") from None
    out = ffi.new("uint32_t *")
    if lib.qes_sigma_threshold(s, out) != lib.QES_OK:
        raise QESError(f"sigma {sigma!r} is not usable: it must be finite, > 0 and <= {SIGMA_MAX}")
    return int(out[0])


def tensor_id(name: str) -> int:
    raw = name.encode("utf-8")
    return int(lib.qes_tensor_id(raw, len(raw)))


def _check_seed(seed, tensor: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise QESError(f"tensor {tensor!r}: seed must be an integer, got {seed!r}")
    s = int(seed)
    if s == 0 or abs(s) > SEED_MAX:
        raise QESError(f"tensor {tensor!r}: seed {s} is outside the supported range: nonzero, |seed| <= 2^31-1")
    return s


def _check_threshold(threshold, tensor: str) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or not 0 < int(threshold) < 2**32:
        raise QESError(f"tensor {tensor!r}: noise threshold must be an integer in (0, 2^32), got {threshold!r} "
                       "(use sigma_threshold(sigma))")
    return int(threshold)


def digest_tensors(tensors, native: bool = False) -> str:
    """sha256 over (name, bytes) of each tensor in order: the weights hash the ledger records.
    Host bytes go through hashlib (or libqes's qes_digest with native=True); the bytes of a
    tensor in a device backend's memory are read where they are, a megabyte at a time through
    a host buffer (SHA-256 is serial), as qes_digest does on a device backend: the same hash
    whichever memory holds which tensor."""
    tensors = list(tensors)
    places = {t._device for t in tensors}
    if native and len(places) <= 1:  # one memory: qes_digest on its backend
        names = [t.name.encode() for t in tensors]
        cnames = [ffi.new("char[]", n) for n in names]
        out = ffi.new("uint8_t[32]")
        with _backend_of(next(iter(places), None)):
            err = lib.qes_digest([t._c for t in tensors], len(tensors), cnames, [len(n) for n in names], out)
        if err:
            raise QESError(f"weights digest: {ffi.string(lib.qes_strerror(err)).decode()}")
        return bytes(ffi.buffer(out, 32)).hex()
    import hashlib
    h = hashlib.sha256()
    stage = None
    for t in tensors:
        h.update(t.name.encode())
        if t._device is None:
            h.update(ffi.buffer(t._ptr, t.n_bytes))
            continue
        if stage is None:
            stage = ffi.new("uint8_t[]", _DIGEST_STAGE)
        for at in range(0, t.n_bytes, _DIGEST_STAGE):
            n = min(_DIGEST_STAGE, t.n_bytes - at)
            t._download(stage, at, n)
            h.update(ffi.buffer(stage, n))
    return h.hexdigest()


_DIGEST_STAGE = 1 << 20


@contextlib.contextmanager
def _backend_of(device: int | None):
    """The tensor's operations run on the backend whose memory holds it: a device backend for a
    tensor that lives there (llama.cpp's offloaded weights), the process's host backend else."""
    if device is None or lib.qes_get_backend() == device:
        yield
        return
    before = lib.qes_get_backend()
    if lib.qes_set_backend(device) != lib.QES_OK:
        raise QESError(f"backend {ffi.string(lib.qes_backend_name(device)).decode()} is not usable here")
    try:
        yield
    finally:
        lib.qes_set_backend(before)


def _copy_in(bid: int, src, n_bytes: int, what: str):
    """n_bytes from host `src` into fresh memory of backend `bid`: the backend's pointer."""
    p = lib.qes_backend_alloc(bid, n_bytes)
    if p == ffi.NULL:
        raise QESError(f"{what}: the backend could not allocate {n_bytes} bytes")
    err = lib.qes_backend_upload(bid, p, src, n_bytes)
    if err:
        lib.qes_backend_free(bid, p)
        raise QESError(f"{what}: copying to the backend: {ffi.string(lib.qes_strerror(err)).decode()}")
    return p


def _copy_out(bid: int, dst, p, n_bytes: int, what: str) -> QESError | None:
    """Bring n_bytes back from the backend's `p` into host `dst` and free `p`; the error, if any."""
    err = lib.qes_backend_download(bid, dst, p, n_bytes)
    lib.qes_backend_free(bid, p)
    return QESError(f"{what}: copying back from the backend: {ffi.string(lib.qes_strerror(err)).decode()}") \
        if err else None


@contextlib.contextmanager
def on_backend(name: str, tensors, copy: bool | None = None):
    """Run the tensors' perturb, restore, update and digest on backend `name` for the duration.
    A device backend (cuda, metal) works on tensors in its own memory: here their bytes are
    copied there (qes_backend_alloc + upload) and back into the tensors at the end (download),
    which is how tests and benchmarks put host bytes through it; copy=True does the same on a
    host backend.  Codes and levels are read on the host only."""
    from qes_edge.native import binding as _native
    before = _native.get_backend()
    copy = _native.is_device(name) if copy is None else copy
    _native.set_backend(name)
    bid = _native.BACKENDS[name]
    held = []
    for t in tensors:
        if t.resident:
            raise QESError(f"tensor {t.name!r} lives in {t.resident} memory: it runs there, not on {name}")
    try:
        if copy:
            for t in tensors:
                p = _copy_in(bid, t._ptr, t.n_bytes, f"tensor {t.name!r} on {name}")
                held.append((t, p))
                t._c.data = ffi.cast("uint8_t *", p)
                t._device = bid
        yield
    finally:
        failed = None
        for t, p in held:
            failed = _copy_out(bid, t._ptr, p, t.n_bytes, f"tensor {t.name!r} on {name}") or failed
            t._c.data = t._ptr
            t._device = None
        _native.set_backend(before)
        if failed:
            raise failed


class _DeviceMemory:
    """Memory of a device backend that a CodeTensor owns (to_device): freed with the tensor."""

    def __init__(self, backend: int, n_bytes: int, what: str, src):
        self.backend = backend
        self.p = _copy_in(backend, src, n_bytes, what)

    def __del__(self):
        if self.p is not None:
            lib.qes_backend_free(self.backend, self.p)
            self.p = None


def to_device(t: CodeTensor, device: str) -> CodeTensor:
    """A copy of host tensor t that lives in device backend `device`'s memory (its own, freed
    with it): what follow --gpu-layers holds instead of the host bytes."""
    from qes_edge.native import binding as _native
    if t._device is not None:
        raise QESError(f"tensor {t.name!r} is already in a device's memory")
    bid = _native.BACKENDS.get(device)
    if bid is None or not _native.is_device(device) or not lib.qes_backend_available(bid):
        raise QESError(f"tensor {t.name!r}: libqes's {device} backend is not usable here")
    mem = _DeviceMemory(bid, t.n_bytes, f"tensor {t.name!r} to {device}", t._ptr)
    return CodeTensor(t.name, t.qtype, t.n_elements, address=int(ffi.cast("uintptr_t", mem.p)), n_bytes=t.n_bytes,
                      keepalive=mem, device=device)


def mirrored(bases) -> np.ndarray:
    """Antithetic population from positive base seeds: [b1, -b1, b2, -b2, ...]."""
    b = np.asarray(bases, dtype=np.int64).reshape(-1)
    return np.stack([b, -b], axis=1).reshape(-1)


def random_steps(rng: np.random.Generator, n_steps: int, population: int, sigma: float, alpha: float) -> list["Step"]:
    """Steps of mirrored members with N(0,1) coefficients clipped to +-3, as a run would record
    them: for the demo and the benchmarks, which need a realistic window without training."""
    from qes_edge.native.fixed_point import coefs_to_q16
    p32 = sigma_threshold(sigma)
    steps = []
    for _ in range(n_steps):
        seeds = mirrored(rng.integers(1, 2**31 - 1, size=population // 2))
        coefs = np.clip(rng.normal(size=population), -3, 3)
        steps.append(Step(seeds, coefs_to_q16(coefs, alpha, sigma), p32))
    return steps


@dataclass
class Step:
    """One recorded step: member seeds, their Q16 coefficients, and the noise threshold."""

    seeds: np.ndarray
    coefs_q16: np.ndarray
    threshold: int

    def __post_init__(self):
        self.seeds = np.ascontiguousarray(self.seeds, dtype=np.int64)
        self.coefs_q16 = np.ascontiguousarray(self.coefs_q16, dtype=np.int32)
        if self.seeds.shape != self.coefs_q16.shape or self.seeds.ndim != 1:
            raise QESError(f"a step needs as many coefficients as seeds ({self.seeds.shape} vs {self.coefs_q16.shape})")


@dataclass
class UpdateStats:
    changed: int
    dropped: int


@dataclass
class Perturbation:
    """What restore needs to undo a perturbation exactly: the seed, threshold and applied-mask."""

    tensor: "CodeTensor"
    seed: int
    threshold: int
    mask: np.ndarray
    applied: int
    restored: bool = field(default=False)

    def restore(self) -> None:
        self.tensor.restore(self)


class CodeTensor:
    """A quantized tensor's raw blocks, edited in place."""

    def __init__(self, name: str, qtype, n_elements: int, data=None, *, address: int | None = None,
                 n_bytes: int | None = None, keepalive=None, device: str | None = None):
        """device: the name of the device backend whose memory holds `address` (a weight that
        llama.cpp offloaded: "cuda"); None: host memory.  A device tensor's perturb, restore,
        update and digest run on that backend, where its bytes are; its codes are not read."""
        self.name = name
        self.info: TypeInfo = type_info(qtype, name)
        self.qtype = self.info.qtype
        self.n_elements = int(n_elements)
        if data is not None:
            arr = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
            if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.flags.c_contiguous:
                arr = arr.reshape(-1).view(np.uint8)
            self._array = arr
            self.n_bytes = arr.nbytes
            self._ptr = ffi.cast("uint8_t *", arr.ctypes.data) if arr.nbytes else ffi.NULL
            self.writable = bool(arr.flags.writeable)
        else:
            if not address:
                raise QESError(f"tensor {name!r}: null buffer")
            self._array = None
            self.n_bytes = int(n_bytes)
            self._ptr = ffi.cast("uint8_t *", address)
            self.writable = True
        self._keepalive = keepalive
        self._device = None  # a backend id: its memory holds the bytes (resident, or for on_backend)
        self.resident = None  # the device backend's name when the tensor lives there (device=)
        if device is not None:
            from qes_edge.native import binding as _native
            if data is not None:
                raise QESError(f"tensor {name!r}: a device tensor is given by its device address, not host data")
            if device not in _native.BACKENDS or not _native.is_device(device):
                raise QESError(f"tensor {name!r}: {device!r} is not a device backend of libqes")
            if not lib.qes_backend_available(_native.BACKENDS[device]):
                raise QESError(f"tensor {name!r} lives in {device} memory, but libqes's {device} backend is not "
                               "usable here (not compiled in, or no device): rebuild qes-edge where the "
                               "toolkit is present, or load the model without --gpu-layers")
            self._device = _native.BACKENDS[device]
            self.resident = device
        self.id = tensor_id(name)
        self._c = ffi.new("qes_tensor *", {"type": int(self.qtype), "n_elements": self.n_elements,
                                          "data": self._ptr, "n_bytes": self.n_bytes, "id": self.id})
        err = lib.qes_tensor_check(self._c)
        if err != lib.QES_OK:
            blocks = self.info.block_elems
            raise _fail(name, self.qtype, err,
                        f"{self.n_elements} elements (blocks of {blocks}) in {self.n_bytes} bytes")

    def __repr__(self):
        where = f", on {self.resident}" if self.resident else ""
        return f"CodeTensor({self.name!r}, {self.qtype.name}, n={self.n_elements}{where})"

    def read_bytes(self, start: int = 0, count: int | None = None) -> bytes:
        """The tensor's raw bytes [start, start+count), read where they are (host or device)."""
        count = self.n_bytes - start if count is None else count
        if start < 0 or count < 0 or start + count > self.n_bytes:
            raise QESError(f"tensor {self.name!r}: bytes [{start}, {start + count}) are outside [0, {self.n_bytes})")
        if self._device is None:
            return bytes(ffi.buffer(self._ptr + start, count))
        out = ffi.new("uint8_t[]", max(1, count))
        self._download(out, start, count)
        return bytes(ffi.buffer(out, count))

    def _download(self, dst, start: int, count: int) -> None:
        """Bytes [start, start+count) of a tensor in device memory into host buffer dst."""
        err = lib.qes_backend_download(self._device, dst, self._c.data + start, count)
        if err:
            raise QESError(f"tensor {self.name!r}: reading it from the device: {ffi.string(lib.qes_strerror(err)).decode()}")

    def _need_host(self, what: str):
        if self._device is not None:
            raise QESError(f"tensor {self.name!r}: cannot {what}: its bytes are in a device backend's memory "
                           "(codes and levels are read on the host)")

    def _need_writable(self, what: str):
        if not self.writable:
            raise QESError(f"tensor {self.name!r}: cannot {what}: its buffer is read-only")

    # -- codes -------------------------------------------------------------------------
    def _span(self, start: int, count: int | None) -> tuple[int, int]:
        count = self.n_elements - start if count is None else count
        if start < 0 or count < 0 or start + count > self.n_elements:
            raise QESError(f"tensor {self.name!r}: elements [{start}, {start + count}) are outside [0, {self.n_elements})")
        return start, count

    def codes(self, start: int = 0, count: int | None = None) -> np.ndarray:
        self._need_host("read codes")
        start, count = self._span(start, count)
        out = np.empty(count, dtype=np.int32)
        err = lib.qes_codes_get(self._c, start, count, ffi.cast("int32_t *", out.ctypes.data))
        if err:
            raise _fail(self.name, self.qtype, err, "reading codes")
        return out

    def set_codes(self, values, start: int = 0) -> None:
        self._need_host("set codes")
        self._need_writable("set codes")
        v = np.ascontiguousarray(values, dtype=np.int64)
        if v.size and (v.min() < self.info.cmin or v.max() > self.info.cmax):
            raise QESError(f"tensor {self.name!r} ({self.qtype.name}): codes must lie in "
                           f"[{self.info.cmin}, {self.info.cmax}]")
        v = v.astype(np.int32)
        start, count = self._span(start, v.size)
        err = lib.qes_codes_set(self._c, start, count, ffi.cast("int32_t *", v.ctypes.data))
        if err:
            raise _fail(self.name, self.qtype, err, "writing codes")

    def levels(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """Dequantized size of one code step for each element."""
        self._need_host("read levels")
        start, count = self._span(start, count)
        out = np.empty(count, dtype=np.float32)
        err = lib.qes_levels(self._c, start, count, ffi.cast("float *", out.ctypes.data))
        if err:
            raise _fail(self.name, self.qtype, err, "reading levels")
        return out

    # -- noise -------------------------------------------------------------------------
    def noise(self, seed: int, threshold: int) -> tuple[np.ndarray, np.ndarray]:
        """The draws of (seed, this tensor) in spec order: element indices and +-1."""
        seed = _check_seed(seed, self.name)
        threshold = _check_threshold(threshold, self.name)
        n = ffi.new("uint64_t *")
        err = lib.qes_noise(self.id, self.n_elements, seed, threshold, ffi.NULL, ffi.NULL, 0, n)
        if err:
            raise _fail(self.name, self.qtype, err, "noise")
        pos = np.empty(n[0], dtype=np.uint64)
        sign = np.empty(n[0], dtype=np.int8)
        err = lib.qes_noise(self.id, self.n_elements, seed, threshold,
                            ffi.cast("uint64_t *", pos.ctypes.data), ffi.cast("int8_t *", sign.ctypes.data),
                            n[0], n)
        if err:
            raise _fail(self.name, self.qtype, err, "noise")
        return pos, sign

    # -- perturb / restore -------------------------------------------------------------
    def perturb(self, seed: int, threshold: int) -> Perturbation:
        self._need_writable("perturb")
        seed = _check_seed(seed, self.name)
        threshold = _check_threshold(threshold, self.name)
        mask = np.empty(max(1, lib.qes_mask_bytes(self.n_elements, threshold)), dtype=np.uint8)
        applied = ffi.new("uint64_t *")
        with _backend_of(self._device):
            err = lib.qes_perturb(self._c, seed, threshold, ffi.cast("uint8_t *", mask.ctypes.data), mask.nbytes,
                                  applied)
        if err:
            raise _fail(self.name, self.qtype, err, f"perturb(seed={seed})")
        return Perturbation(self, seed, int(threshold), mask, int(applied[0]))

    def restore(self, p: Perturbation) -> None:
        if p.tensor is not self:
            raise QESError(f"tensor {self.name!r}: this perturbation belongs to {p.tensor.name!r}")
        if p.restored:
            raise QESError(f"tensor {self.name!r}: perturbation seed {p.seed} was already restored")
        with _backend_of(self._device):
            err = lib.qes_restore(self._c, p.seed, p.threshold, ffi.cast("uint8_t *", p.mask.ctypes.data),
                                  p.mask.nbytes)
        if err:
            raise _fail(self.name, self.qtype, err, f"restore(seed={p.seed})")
        p.restored = True

    # -- update ------------------------------------------------------------------------
    def update(self, steps: Sequence[Step], residual: np.ndarray | None = None, *, beta: float = 0.9,
               clamp_q16: int = DEFAULT_CLAMP_Q16, anti_windup: bool = True, threads: int = 0) -> UpdateStats:
        """Apply the last of ``steps``; the ones before it are replayed into the residual.

        residual None: seed replay (the residual starts from zero at steps[0]).  Otherwise an
        int32 Q16 array of n_elements, read and written back (stored-residual mode)."""
        self._need_writable("update")
        if not steps:
            raise QESError(f"tensor {self.name!r}: update needs at least one step")
        cs = ffi.new("qes_step[]", len(steps))
        keep = []
        for i, st in enumerate(steps):
            keep.append(st)
            cs[i].seeds = ffi.cast("int64_t *", st.seeds.ctypes.data) if st.seeds.size else ffi.NULL
            cs[i].coefs = ffi.cast("int32_t *", st.coefs_q16.ctypes.data) if st.coefs_q16.size else ffi.NULL
            cs[i].n_members = st.seeds.size
            cs[i].threshold = _check_threshold(st.threshold, self.name)
        rptr = ffi.NULL
        if residual is not None:
            if residual.dtype != np.int32 or residual.shape != (self.n_elements,) or not residual.flags.c_contiguous:
                raise QESError(f"tensor {self.name!r}: residual must be a contiguous int32 array of {self.n_elements}")
            rptr = ffi.cast("int32_t *", residual.ctypes.data)
        dev = None
        if rptr != ffi.NULL and self._device is not None:  # the residual goes where the codes are, for the call
            dev = _copy_in(self._device, rptr, residual.nbytes, f"tensor {self.name!r}: residual")
        params = ffi.new("qes_update_params *", {"beta_q14": beta_to_q14(beta), "clamp_q16": clamp_q16,
                                                 "flags": lib.QES_UPDATE_ANTI_WINDUP if anti_windup else 0,
                                                 "n_threads": threads})
        stats = ffi.new("qes_update_stats *")
        if dev is None:
            with _backend_of(self._device):
                err = lib.qes_update(self._c, cs, len(steps), rptr, params, stats)
        else:
            try:
                with _backend_of(self._device):
                    err = lib.qes_update(self._c, cs, len(steps), ffi.cast("int32_t *", dev), params, stats)
            finally:
                back = _copy_out(self._device, rptr, dev, residual.nbytes, f"tensor {self.name!r}: residual")
            if back and not err:
                raise back
        if err:
            raise _fail(self.name, self.qtype, err, "update")
        return UpdateStats(int(stats.changed), int(stats.dropped))


@dataclass
class GroupPerturbation:
    """One seed's perturbation of every tensor of a TensorGroup; restore() undoes it exactly."""

    group: "TensorGroup"
    seed: int
    threshold: int
    masks: list
    applied: np.ndarray
    restored: bool = field(default=False)

    def restore(self) -> None:
        self.group.restore(self)


class TensorGroup:
    """Tensors perturbed and restored together: one call into libqes for the tensors of each
    memory (the host's, each device's), the host's spread over the cores in groups of chunks.
    The bytes are those of perturbing them one by one: a tensor's noise depends on its name and
    the seed only, so the split between memories changes nothing."""

    def __init__(self, tensors: Sequence[CodeTensor], threads: int = 0):
        self.tensors = list(tensors)
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise QESError("a tensor group needs distinct tensors (a name appears twice)")
        for t in self.tensors:
            t._need_writable("perturb")
        self.threads = int(threads)
        # (device id or None, indices into tensors, their qes_tensor pointers): host first
        order = sorted({t._device for t in self.tensors}, key=lambda d: -1 if d is None else d)
        self._parts = []
        for d in order:
            idx = [i for i, t in enumerate(self.tensors) if t._device == d]
            self._parts.append((d, idx, ffi.new("qes_tensor *[]", [self.tensors[i]._c for i in idx])))

    def _masks(self, threshold: int, masks=None):
        if masks is None:
            masks = [np.empty(max(1, lib.qes_mask_bytes(t.n_elements, threshold)), dtype=np.uint8)
                     for t in self.tensors]
        return masks

    def _part_masks(self, masks, idx):
        ptrs = ffi.new("uint8_t *[]", [ffi.cast("uint8_t *", masks[i].ctypes.data) for i in idx])
        sizes = np.array([masks[i].nbytes for i in idx], dtype=np.uint64)
        return ptrs, sizes

    def _fail(self, err: int, failed: int, what: str) -> QESError:
        t = self.tensors[failed] if 0 <= failed < len(self.tensors) else self.tensors[0]
        return _fail(t.name, t.qtype, err, what)

    def perturb(self, seed: int, threshold: int) -> GroupPerturbation:
        where = self.tensors[0].name if self.tensors else "group"
        seed, threshold = _check_seed(seed, where), _check_threshold(threshold, where)
        masks = self._masks(threshold)
        applied = np.zeros(len(self.tensors), dtype=np.uint64)
        failed = ffi.new("uint32_t *")
        done = []
        for d, idx, cts in self._parts:
            ptrs, sizes = self._part_masks(masks, idx)
            got = np.zeros(len(idx), dtype=np.uint64)
            with _backend_of(d):
                err = lib.qes_perturb_many(cts, len(idx), seed, threshold, ptrs,
                                           ffi.cast("uint64_t *", sizes.ctypes.data), self.threads,
                                           ffi.cast("uint64_t *", got.ctypes.data), failed)
            if err:  # the memories done so far go back as they were: nothing half-applied is left
                for dd, ii, cc in done:
                    self._restore_part(dd, ii, cc, seed, threshold, masks)
                raise self._fail(err, idx[failed[0]] if failed[0] < len(idx) else -1, f"perturb(seed={seed})")
            applied[idx] = got
            done.append((d, idx, cts))
        return GroupPerturbation(self, seed, threshold, masks, applied)

    def _restore_part(self, d, idx, cts, seed, threshold, masks) -> None:
        ptrs, sizes = self._part_masks(masks, idx)
        failed = ffi.new("uint32_t *")
        with _backend_of(d):
            err = lib.qes_restore_many(cts, len(idx), seed, threshold, ptrs,
                                       ffi.cast("uint64_t *", sizes.ctypes.data), self.threads, failed)
        if err:
            raise self._fail(err, idx[failed[0]] if failed[0] < len(idx) else -1, f"restore(seed={seed})")

    def restore(self, p: GroupPerturbation) -> None:
        if p.group is not self:
            raise QESError("this perturbation belongs to another tensor group")
        if p.restored:
            raise QESError(f"perturbation seed {p.seed} was already restored")
        for d, idx, cts in self._parts:
            self._restore_part(d, idx, cts, p.seed, p.threshold, p.masks)
        p.restored = True
