"""The per-op backend registry: which arithmetic backends an op has, which of
them can run on this machine, and which one a call uses.

Every op (``rexfast/ops/<op>/op.py``) creates one :class:`OpBackends` and
registers a :class:`Backend` per implementation (``rexfast.ops.common.op_backends``
does both):

  ``reference`` – its pure-PyTorch reference (``<op>/reference.py``); runs anywhere.
  ``cpu``       – C++ kernels in ``rexfast._C`` (``csrc/cpu/<op>.cpp``), CPU tensors.
  ``cuda``      – CUDA kernels in ``rexfast._C`` (``kernels/<op>.cu`` + ``csrc/cuda/<op>.cu``).
  ``triton``    – Triton kernels (``<op>/triton_kernels.py``, or a family's shared one such as
                  ``region_attention/triton_kernels.py``); CUDA tensors, or CPU tensors when
                  ``TRITON_INTERPRET=1`` (the interpreter, used by the tests).

Choice for one call, first match wins: the op's ``backend=`` argument, the
environment variable ``REXFAST_BACKEND``, then automatic: the op's preference
list for the device type, skipping what is unavailable. An explicitly requested
backend that cannot run raises and says why; an automatic choice that has to
fall back to the reference (no kernel for the device, or the extension missing)
logs one warning per (op, device type), so a missing kernel never hides. The
``rexfast`` logger says at INFO level which backend each op runs.

Nothing here imports triton: its availability is probed on first use (and
``import rexfast`` stays light). Backend choice is folded to a constant under
``torch.compile`` (as :func:`torch.compiler.assume_constant_result` does), so
ops stay traceable with ``fullgraph=True``.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

log = logging.getLogger("rexfast")

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "REXFAST_BACKEND"


# ----------------------------------------------------------------------------- what is installed
def _probe_extension():
    """Import rexfast._C once; return (module or None, error text or None)."""
    try:
        module = importlib.import_module("rexfast._C")
    except ImportError as exc:  # not built, or built against another torch
        log.warning(
            "rexfast._C is not importable (%s); the C++/CUDA backends are unavailable. "
            "Rebuild with: pip install -e . --no-build-isolation",
            exc,
        )
        return None, str(exc)
    return module, None


# Probed once at import (the extension is light; its static registrations define
# the torch.ops.rexfast_C schemas the ops call).
_EXTENSION, _EXTENSION_ERROR = _probe_extension()


def extension_error() -> Optional[str]:
    return _EXTENSION_ERROR


def extension_built() -> bool:
    return _EXTENSION is not None


def extension_has_cuda() -> bool:
    return _EXTENSION is not None and bool(torch.ops.rexfast_C.compiled_with_cuda())


def native_kernel(symbol: str, dispatch_key: str) -> Optional[str]:
    """None when ``rexfast_C::<symbol>`` has a kernel for ``dispatch_key`` (CPU/CUDA), else why not."""
    if _EXTENSION is None:
        return f"rexfast._C is not built ({_EXTENSION_ERROR})"
    if dispatch_key == "CUDA" and not extension_has_cuda():
        return "rexfast._C was built without CUDA"
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"rexfast_C::{symbol}", dispatch_key)
    except RuntimeError:  # the schema itself is missing
        has = False
    return None if has else f"rexfast._C has no {dispatch_key} kernel for {symbol} (rebuild the extension)"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_STATE: dict = {}


def triton_error() -> Optional[str]:
    """None when triton imports, else the import error (probed once, on first use)."""
    if "error" not in _TRITON_STATE:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_STATE["error"] = None
            _TRITON_STATE["version"] = triton.__version__
        except Exception as exc:  # pragma: no cover - depends on the install
            _TRITON_STATE["error"] = f"{type(exc).__name__}: {exc}"
    return _TRITON_STATE["error"]


def triton_version() -> Optional[str]:
    return None if triton_error() else _TRITON_STATE["version"]


def triton_runs_on(device_type: str) -> Optional[str]:
    """None when Triton kernels can run on ``device_type`` tensors here, else why not."""
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels do not run {device_type} tensors"
    if triton_error() is not None:
        return f"triton is not importable ({triton_error()})"
    if device_type == "cpu" and not triton_interpret():
        return "it needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"
    if device_type == "cuda" and triton_interpret():
        return "TRITON_INTERPRET=1 runs Triton on CPU tensors only"
    return None


# ----------------------------------------------------------------------------- one op's backends
@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``forward`` / ``backward`` take the op's registered arguments (see the op's
    module); ``unavailable(device_type)`` returns None when this backend can run
    tensors of that device type on this machine, else the reason it cannot.
    """

    name: str
    forward: Callable
    backward: Optional[Callable]
    unavailable: Callable[[str], Optional[str]]

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"backend name must be one of {BACKENDS}, got {self.name!r}")


def reference_backend(forward: Callable, backward: Optional[Callable]) -> Backend:
    return Backend("reference", forward, backward, lambda device_type: None)


def cpu_backend(forward: Callable, backward: Optional[Callable], symbol: str) -> Backend:
    """The C++ CPU kernel ``rexfast_C::<symbol>`` (any of the op's C++ symbols)."""
    return Backend("cpu", forward, backward,
                   lambda dt: native_kernel(symbol, "CPU") if dt == "cpu" else "it runs CPU tensors only")


def cuda_backend(forward: Callable, backward: Optional[Callable], symbol: str) -> Backend:
    return Backend("cuda", forward, backward,
                   lambda dt: native_kernel(symbol, "CUDA") if dt == "cuda" else "it runs CUDA tensors only")


def triton_backend(forward: Callable, backward: Optional[Callable]) -> Backend:
    return Backend("triton", forward, backward, triton_runs_on)


# Automatic choice, best first. Triton on CPU is the interpreter: never chosen automatically.
DEFAULT_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


class OpBackends:
    """The backends of one op and the rule that picks one per call."""

    def __init__(self, op: str, preference: Optional[dict] = None, triton_module: Optional[str] = None):
        self.op = op
        self.triton_module = triton_module  # module holding the Triton kernels and compile_configs()
        self.preference = dict(DEFAULT_PREFERENCE if preference is None else preference)
        self._backends: dict[str, Backend] = {}
        OPS[op] = self

    def register(self, backend: Backend) -> Backend:
        if backend.name in self._backends:
            raise ValueError(f"{self.op}: backend {backend.name!r} is registered twice")
        self._backends[backend.name] = backend
        return backend

    def __getitem__(self, name: str) -> Backend:
        return self._backends[name]

    @property
    def names(self) -> tuple[str, ...]:
        """The backends this op has (whether or not they can run here)."""
        return tuple(self._backends)

    def available(self, device_type: str) -> list[str]:
        """Backends that can run this op on tensors of ``device_type`` here."""
        return [n for n, b in self._backends.items() if b.unavailable(device_type) is None]

    def why_unavailable(self, name: str, device_type: str) -> str:
        if name not in self._backends:
            return f"{self.op} has no {name} backend (it has {list(self._backends)})"
        return self._backends[name].unavailable(device_type) or ""

    def choose(self, device: torch.device, requested: Optional[str]) -> str:
        """The backend name for one call on tensors of ``device``."""
        return _choose(self, device.type, requested, os.environ.get(ENV_VAR) or None)

    def info(self) -> dict:
        out = {}
        for device_type in ("cpu", "cuda"):
            out[device_type] = {n: self.why_unavailable(n, device_type) or "available" for n in self._backends}
        return out


OPS: dict[str, OpBackends] = {}

_noted: set = set()


def _note_once(level: int, key, msg: str, *args) -> None:
    if key not in _noted:
        _noted.add(key)
        log.log(level, msg, *args)


def _constant_under_compile(fn):
    """:func:`torch.compiler.assume_constant_result` without its import of
    ``torch._dynamo`` (which imports triton) when rexfast is imported: that
    decorator only sets this attribute (a test holds the two equal)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def _choose(op: OpBackends, device_type: str, requested: Optional[str], env: Optional[str]) -> str:
    explicit = requested or env
    if explicit is not None:
        if explicit not in BACKENDS:
            raise ValueError(f"{op.op}: unknown backend {explicit!r}; choose one of {BACKENDS}")
        if explicit not in op.available(device_type):
            source = "backend=" if requested else f"{ENV_VAR}="
            raise RuntimeError(
                f"{op.op}: backend {explicit!r} ({source}{explicit}) cannot run {device_type} tensors here "
                f"({op.why_unavailable(explicit, device_type)}); available: {op.available(device_type)}"
            )
        name = explicit
    else:
        options = op.available(device_type)
        name = next((b for b in op.preference.get(device_type, ("reference",)) if b in options), "reference")
        if name == "reference" and device_type in ("cpu", "cuda"):
            fused = [b for b in op.preference.get(device_type, ()) if b != "reference"]
            reasons = "; ".join(f"{b}: {op.why_unavailable(b, device_type)}" for b in fused) or "none written"
            _note_once(logging.WARNING, (op.op, device_type, "fallback"),
                       "%s: no fused backend runs %s tensors here (%s); using the PyTorch reference",
                       op.op, device_type, reasons)
    _note_once(logging.INFO, (op.op, device_type, name), "%s on %s runs the %s backend", op.op, device_type, name)
    return name


# ----------------------------------------------------------------------------- rexfast info
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def info() -> dict:
    """What this install can run, for ``rexfast info``: per op and device type,
    the backends that run and why the others do not."""
    import platform

    cuda = torch.cuda.is_available()
    out = {
        "rexfast_extension": "built" if extension_built() else f"missing ({extension_error()})",
        "extension_cuda": extension_has_cuda(),
        "triton": triton_version() or f"missing ({triton_error()})",
        "triton_interpret": triton_interpret(),
        "ops": {name: op.info() for name, op in sorted(OPS.items())},
        "backends_cpu": {name: op.available("cpu") for name, op in sorted(OPS.items())},
        "backends_cuda": {name: op.available("cuda") for name, op in sorted(OPS.items())} if cuda else {},
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "env_override": os.environ.get(ENV_VAR),
    }
    return out


__all__ = [
    "BACKENDS", "ENV_VAR", "Backend", "OpBackends", "OPS", "reference_backend", "cpu_backend", "cuda_backend",
    "triton_backend", "extension_built", "extension_error", "extension_has_cuda", "native_kernel", "triton_error",
    "triton_interpret", "triton_runs_on", "info",
]
