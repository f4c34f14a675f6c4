"""The one place a device name (``--device``, ``train.device``) becomes a ``torch.device``.

``auto`` is the first CUDA device when torch sees one, else the CPU. Any other name is
checked against what this torch build and machine have *before* a model is loaded, so
that ``--device cuda`` on a CPU-only torch is one sentence naming the device asked for
and the devices there are, not torch's ``AssertionError: Torch not compiled with CUDA
enabled`` from deep inside the first ``.to()``.

Only torch is imported here.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_devices", "resolve_device", "usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: ``taskset -c 0`` gives 1 on any
    machine), where the OS reports it; else ``os.cpu_count()``, which counts the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def available_devices() -> list[str]:
    """The device names this torch can run on here, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names += [f"xpu:{i}" for i in range(xpu.device_count())]
    return names


def _this_torch() -> str:
    """What this torch build has, in words: its version and GPU toolkit, or that it has none."""
    cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    if cuda:
        built = f"built with CUDA {cuda}"
    elif hip:
        built = f"built with ROCm {hip}"
    else:
        built = "a CPU-only build"
    return f"this torch ({torch.__version__}) is {built}"


def resolve_device(device="auto", name: str = "--device", *, index: int | None = None) -> torch.device:
    """``device`` ("auto", "cpu", "cuda", "cuda:1", "mps", ..., or a ``torch.device``) as a
    ``torch.device`` this machine has. ``index`` picks the CUDA device for a bare "cuda" or
    "auto" (torchrun's local rank). ValueError naming ``name``, the device asked for, what
    this torch build has and the devices it can use, when the device is not there."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not device.strip():
        raise ValueError(f"{name} must be a device name such as auto, cpu or cuda, got {device!r}")
    asked = device.strip().lower()
    if asked == "auto":
        asked = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(asked)
    except RuntimeError:
        raise ValueError(f"{name} {device!r} is not a device name: expected auto, cpu, cuda, cuda:N or mps "
                         f"(here: {', '.join(available_devices())})") from None
    have = available_devices()
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (" but sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)"
                   if torch.version.cuda else "")
            fix = "" if torch.version.cuda else ", or install a CUDA build of torch"
            raise ValueError(f"{name} {device}: {_this_torch()}{why}; it can run on: {', '.join(have)} "
                             f"(use {name}{'=' if '.' in name else ' '}cpu{fix})")
        if dev.index is None:
            if index is None:
                return dev
            dev = torch.device("cuda", index)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA device(s): "
                             f"{', '.join(d for d in have if d.startswith('cuda'))}")
        return dev
    if str(dev) not in have and dev.type not in {h.split(":")[0] for h in have}:
        raise ValueError(f"{name} {device}: {_this_torch()} and finds no {dev.type} device here; it can run on: "
                         f"{', '.join(have)}")
    return dev
