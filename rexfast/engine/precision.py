"""The precision mode of CPU inference and training: ``fp32 | bf16 | auto``.

``auto`` is bf16 where the CPU multiplies bf16 natively (AMX tiles or the
AVX512-BF16 dot-product instructions, as torch detects them) and fp32 elsewhere:
without native bf16, oneDNN emulates it through fp32 and bf16 only costs accuracy.
On a GPU the existing AMP setting stays in charge (``train.amp``); there ``auto``
keeps fp32 weights, and ``bf16`` is honoured when asked for explicitly.

Only torch is imported here (``rexfast info`` reports the resolution).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger("rexfast")

PRECISIONS = ("fp32", "bf16", "auto")


def cpu_bf16_support() -> Optional[str]:
    """The CPU's native bf16 instructions as torch sees them ("AMX-BF16", "AVX512-BF16"), or None."""
    # private helpers of torch.cpu; a torch without them is treated as "no native bf16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    try:
        if amx():
            return "AMX-BF16"
        if avx512_bf16():
            return "AVX512-BF16"
    except RuntimeError:  # pragma: no cover - a torch built without the cpuinfo probe
        return None
    return None


def check_precision(precision, name: str = "precision") -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device="cpu", *, name: str = "precision") -> str:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device``."""
    check_precision(precision, name)
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type != "cpu":
        return "fp32"  # the GPU path keeps its own AMP setting
    return "bf16" if cpu_bf16_support() else "fp32"


def describe(precision: str, device="cpu") -> str:
    """One line for the log and ``rexfast info``: the mode that runs and why."""
    resolved = resolve_precision(precision, device)
    device = torch.device(device)
    if device.type != "cpu":
        why = "explicit" if precision != "auto" else "auto on a GPU: fp32 weights, the AMP setting decides"
    elif precision == "auto":
        native = cpu_bf16_support()
        why = f"auto: this CPU has {native}" if native else "auto: this CPU has no native bf16"
    else:
        why = "explicit"
    return f"{resolved} ({why})"


__all__ = ["PRECISIONS", "check_precision", "cpu_bf16_support", "describe", "resolve_precision"]
