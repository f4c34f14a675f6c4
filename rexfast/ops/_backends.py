"""Which arithmetic backends exist on this machine, and which one an op call uses.

Backends:
  ``reference`` – pure PyTorch (``rexfast/ops/reference.py``), always available.
  ``cpu``       – C++ kernels in ``rexfast._C`` (``csrc/cpu``), CPU tensors.
  ``cuda``      – CUDA kernels in ``rexfast._C`` (``kernels/`` + ``csrc/cuda``).
  ``triton``    – Triton kernels (``rexfast/triton``); CUDA tensors, or CPU
                  tensors when ``TRITON_INTERPRET=1`` (the interpreter).

Choice, first match wins: the op's ``backend=`` argument, the environment
variable ``REXFAST_BACKEND``, then automatic (CUDA tensor → triton, else cuda;
CPU tensor → cpu; anything else → reference). An explicitly requested backend
that cannot run raises; an automatic choice that has to fall back to the
reference logs a warning once, so a missing extension never hides.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

log = logging.getLogger("rexfast")

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "REXFAST_BACKEND"


def _probe_extension():
    """Import rexfast._C once; return (module or None, error text or None)."""
    try:
        module = importlib.import_module("rexfast._C")
    except ImportError as exc:  # not built, or built against another torch
        log.warning(
            "rexfast._C is not importable (%s); C++/CUDA backends are unavailable. "
            "Rebuild with: pip install -e . --no-build-isolation",
            exc,
        )
        return None, str(exc)
    return module, None


# Probed once at import so that backend choice is plain lookups (traceable by
# torch.compile with fullgraph=True).
_EXTENSION, _EXTENSION_ERROR = _probe_extension()
_HAS_CPU_EXT = _EXTENSION is not None and hasattr(torch.ops.rexfast_C, "group_assign_fwd")
_HAS_CUDA_EXT = _HAS_CPU_EXT and bool(torch.ops.rexfast_C.compiled_with_cuda())


def extension():
    return _EXTENSION


def extension_error() -> str | None:
    return _EXTENSION_ERROR


def has_cpu_extension() -> bool:
    return _HAS_CPU_EXT


def has_cuda_extension() -> bool:
    return _HAS_CUDA_EXT


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_triton() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"{type(exc).__name__}: {exc}"
    return None


_TRITON_ERROR = _probe_triton()


def triton_error() -> str | None:
    return _TRITON_ERROR


def available(device_type: str) -> list[str]:
    """Backends that can run an op on tensors of ``device_type``."""
    names = ["reference"]
    if device_type == "cpu":
        if has_cpu_extension():
            names.append("cpu")
        if triton_error() is None and triton_interpret():
            names.append("triton")
    elif device_type == "cuda":
        if has_cuda_extension():
            names.append("cuda")
        if triton_error() is None and not triton_interpret():
            names.append("triton")
    return names


def info() -> dict:
    """A summary of what this install can run, for ``rexfast info``."""
    import platform

    out = {
        "rexfast_extension": "built" if has_cpu_extension() else f"missing ({extension_error()})",
        "extension_cuda": has_cuda_extension(),
        "triton": triton_error() or __import__("triton").__version__,
        "triton_interpret": triton_interpret(),
        "backends_cpu": available("cpu"),
        "backends_cuda": available("cuda") if torch.cuda.is_available() else [],
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "env_override": os.environ.get(ENV_VAR),
    }
    return out


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


_warned: set = set()


def _note_once(level, key, msg, *args):
    if key not in _warned:
        _warned.add(key)
        log.log(level, msg, *args)


def choose(op: str, device: torch.device, requested: str | None) -> str:
    """Resolve the backend for one call of ``op`` on ``device``."""
    device_type = device.type
    explicit = requested or os.environ.get(ENV_VAR) or None
    if explicit is not None:
        if explicit not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {explicit!r}; choose one of {BACKENDS}")
        if explicit not in available(device_type):
            why = {
                "cpu": "rexfast._C was not built" if not has_cpu_extension() else "it runs CPU tensors only",
                "cuda": "rexfast._C was built without CUDA" if not has_cuda_extension() else "it runs CUDA tensors only",
                "triton": "it needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1",
            }.get(explicit, "")
            raise RuntimeError(
                f"{op}: backend {explicit!r} cannot run {device_type} tensors here ({why}); "
                f"available: {available(device_type)}"
            )
        name = explicit
    else:
        options = available(device_type)
        if device_type == "cuda":
            preference = ("triton", "cuda", "reference")
        elif device_type == "cpu":
            preference = ("cpu", "reference")
        else:
            preference = ("reference",)
        name = next(b for b in preference if b in options)
        if name == "reference" and device_type in ("cpu", "cuda") and not torch.compiler.is_compiling():
            _note_once(
                logging.WARNING,
                (op, device_type, "fallback"),
                "%s: no fused backend for %s tensors (extension: %s); using the PyTorch reference",
                op,
                device_type,
                "built" if has_cpu_extension() else "missing",
            )
    if not torch.compiler.is_compiling():
        _note_once(logging.INFO, (op, device_type, name), "%s on %s runs the %s backend", op, device_type, name)
    return name
