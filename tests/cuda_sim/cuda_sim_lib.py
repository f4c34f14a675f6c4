"""ctypes bindings of the cuda_sim library and its "device memory".

Device memory here is host memory the library maps between two inaccessible
guard pages and fills with 0xFF bytes (NaN for every float type), wrapped as a
torch CPU tensor: a kernel that reads or writes past the end of a buffer (or,
with ``guard="front"``, before its start) dies with a message naming the buffer,
the offset, the kernel, the block and the thread; an element a kernel forgets
to write reads back as NaN (or -1 for integers); the gaps of a strided input
are NaN too, so a kernel reading them shows it.
"""

from __future__ import annotations

import contextlib
import ctypes
import weakref
from dataclasses import dataclass

import torch

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
ERRORS = {0: "cudaSuccess", 1: "cudaErrorInvalidValue", 2: "cudaErrorMemoryAllocation",
          9: "cudaErrorInvalidConfiguration", 98: "cudaErrorInvalidDeviceFunction", 700: "cudaErrorIllegalAddress",
          701: "cudaErrorLaunchOutOfResources", 719: "cudaErrorLaunchFailure"}
SUCCESS, INVALID_VALUE, INVALID_CONFIGURATION, LAUNCH_FAILURE = 0, 1, 9, 719
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

P, I64, I32, U32, SZ, DBL, FLT = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t,
                                  ctypes.c_double, ctypes.c_float)

_SIGNATURES = {
    "sim_set": (I32, [ctypes.c_char_p, ctypes.c_longlong]),
    "sim_get": (ctypes.c_longlong, [ctypes.c_char_p]),
    "sim_reset": (None, []),
    "sim_fault": (ctypes.c_char_p, []),
    "sim_launch_count": (I32, []),
    "sim_launch_info": (I32, [I32, ctypes.c_char_p, I32]),
    "sim_malloc": (P, [SZ, SZ, I32]),
    "sim_free": (None, [P]),
    "sim_group_assign_workspace": (SZ, [I32, I32, P]),
    "sim_group_assign_fwd": (I32, [I32, P, P, P, P, P, P, P, P, P, U32, I32, P, P, P, P, SZ]),
    "sim_group_assign_bwd": (I32, [I32, P, P, P, P, P, P, P, P, P, U32, I32, P, P, P, P, P, P, P, P, P, P, SZ]),
    "sim_msda_workspace": (SZ, [I32, P, I32]),
    "sim_msda_fwd": (I32, [I32, P, P, P, P, P, P, P, P]),
    "sim_msda_bwd": (I32, [I32, P, P, P, P, P, P, P, P, P, P, P, I32, P, SZ]),
    "sim_region_attention": (I32, [I32, I32, P, P, P, P, P, P, P, DBL, I32, P, P, I32, FLT, P, P, P, P, P, P, P, P,
                                   P, P, P, P, P, P, P]),
    "sim_test_index": (I32, [P, P, P]),
    "sim_test_block_sum": (I32, [P, P, I32, I32, I32]),
    "sim_test_warp_ops": (I32, [P, P, P, I32, I32, I32]),
    "sim_test_half_warp": (I32, [P, P]),
    "sim_test_atomics": (I32, [I32, I32, P, P, P, P, P, P]),
    "sim_test_neighbour": (I32, [P, I32, I32]),
    "sim_test_fault": (I32, [I32, P]),
    "sim_test_write": (I32, [P, I64]),
    "sim_test_smem_write": (I32, [SZ, I64]),
    "sim_test_launch_config": (I32, [I32, I32]),
    "sim_test_float2half": (None, [P, P, I64]),
    "sim_test_half2float": (None, [P, P, I64]),
    "sim_test_float2bf16": (None, [P, P, I64]),
    "sim_test_bf162float": (None, [P, P, I64]),
    "sim_test_float_op": (None, [I32, P, P, P, P, I64]),
    "sim_test_sort_pairs": (I32, [P, P, P, P, I32, I32, I32]),
}


class SimError(RuntimeError):
    """A launcher returned an error, or a kernel misbehaved in a way the simulation detects."""


@dataclass(frozen=True)
class LaunchRecord:
    name: str
    grid: tuple
    block: tuple
    smem: int
    status: int


class Sim:
    """The loaded library: settings, launch log, guarded memory."""

    def __init__(self, path):
        self.path = str(path)
        self.lib = ctypes.CDLL(self.path)
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = res, args
        self.guard = "back"

    # ---------------------------------------------------------------- settings and state
    def configure(self, **settings) -> None:
        """workers=, schedule= ('forward' | 'reverse' | 'random'), seed=, smem_optin=, stack_kib=."""
        for key, value in settings.items():
            if key == "schedule":
                value = SCHEDULES[value]
            if self.lib.sim_set(key.encode(), int(value)) != 0:
                raise ValueError(f"cuda_sim: bad setting {key}={value!r}")

    def get(self, key: str) -> int:
        return int(self.lib.sim_get(key.encode()))

    @contextlib.contextmanager
    def settings(self, **settings):
        """Temporarily change settings (restored afterwards)."""
        keys = [k for k in settings if k != "stack_kib"]
        old = {k: self.get(k) for k in keys}
        self.configure(**settings)
        try:
            yield self
        finally:
            for k, v in old.items():
                self.lib.sim_set(k.encode(), v)

    def reset(self) -> None:
        self.lib.sim_reset()

    def fault(self) -> str:
        return (self.lib.sim_fault() or b"").decode(errors="replace")

    def launches(self) -> list[LaunchRecord]:
        buf = ctypes.create_string_buffer(4096)
        out = []
        for i in range(self.lib.sim_launch_count()):
            self.lib.sim_launch_info(i, buf, len(buf))
            name, grid, block, smem, status = buf.value.decode().split("|")
            out.append(LaunchRecord(name, tuple(map(int, grid.split())), tuple(map(int, block.split())), int(smem),
                                    int(status)))
        return out

    def check(self, status: int, what: str) -> None:
        """Raise SimError unless ``status`` is cudaSuccess and no kernel faulted."""
        fault = self.fault()
        if status != SUCCESS or fault:
            raise SimError(f"{what}: {ERRORS.get(status, status)}" + (f": {fault}" if fault else ""))

    # ---------------------------------------------------------------- memory
    def _alloc(self, nbytes: int, align: int):
        mode = 1 if self.guard == "front" else 0
        ptr = self.lib.sim_malloc(nbytes, align, mode)
        if not ptr:
            raise MemoryError(f"cuda_sim: cannot map {nbytes} bytes")
        return ptr

    def raw(self, nbytes: int, align: int = 8) -> torch.Tensor:
        """``nbytes`` uint8 of device memory (0xFF)."""
        return self.empty((nbytes,), torch.uint8, align=align)

    def empty(self, shape, dtype, *, stride=None, align: int | None = None) -> torch.Tensor:
        """A device tensor of 0xFF bytes (NaN / -1), contiguous or with the given strides
        (the storage then spans exactly the elements the strides reach)."""
        shape = tuple(int(s) for s in shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if stride is None:
            stride, acc = [], 1
            for s in reversed(shape):
                stride.insert(0, acc)
                acc *= max(s, 1)
        stride = tuple(int(s) for s in stride)
        numel = 1
        for s in shape:
            numel *= s
        extent = 0 if numel == 0 else 1 + sum((s - 1) * st for s, st in zip(shape, stride))
        nbytes = extent * itemsize
        ptr = self._alloc(nbytes, align or itemsize)
        if nbytes == 0:
            t = torch.empty(shape, dtype=dtype)
            weakref.finalize(t, self.lib.sim_free, ptr)
        else:
            array = (ctypes.c_ubyte * nbytes).from_address(ptr)
            weakref.finalize(array, self.lib.sim_free, ptr)
            t = torch.frombuffer(array, dtype=torch.uint8).view(dtype).as_strided(shape, stride)
        t._sim_ptr = ptr
        return t

    def device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A device copy of ``t`` with the same shape and strides (None stays None)."""
        if t is None:
            return None
        d = self.empty(t.shape, t.dtype, stride=t.stride() if t.numel() else None)
        if t.numel():
            d.copy_(t.detach())
        return d

    @staticmethod
    def ptr(t: torch.Tensor | None) -> int | None:
        """The device address of a tensor from :meth:`empty`/:meth:`device` (None for None)."""
        if t is None:
            return None
        if not hasattr(t, "_sim_ptr"):
            raise TypeError("cuda_sim: pass tensors made by Sim.empty/Sim.device (guarded device memory)")
        return t._sim_ptr


def i64(*values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)
