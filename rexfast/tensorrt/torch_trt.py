"""The ops' inference decompositions as torch-TensorRT lowerings.

``torch_tensorrt.compile(model, ir="dynamo")`` lowers a ``torch.export`` program with its
decomposition table before converting aten ops to TensorRT layers; registering each
``rexfast::<op>``'s decomposition (:data:`rexfast.ops.decompositions.INFERENCE_DECOMPOSITIONS`)
there turns the custom ops into aten ops TensorRT converts. torch-TensorRT's helper is
``torch._decomp.register_decomposition`` with its registry; the tests run that same
registration into a plain dict and lower the tiny models with it (torch-TensorRT itself
cannot be installed here: it needs TensorRT).
"""

from __future__ import annotations

from typing import Callable, Optional


def register_torch_tensorrt_decompositions(register: Optional[Callable] = None, registry=None) -> dict:
    """Register every op's inference decomposition with torch-TensorRT (or with ``register``
    and ``registry``, e.g. ``torch._decomp.register_decomposition`` and a dict); returns
    {registered op: decomposition}."""
    from rexfast.ops.decompositions import INFERENCE_DECOMPOSITIONS

    if register is None:
        try:
            from torch_tensorrt.dynamo.lowering import TORCH_TRT_DECOMPOSITIONS
            from torch_tensorrt.dynamo.lowering._decompositions import register_torch_trt_decomposition
        except ImportError as exc:
            raise ImportError(f"the torch-TensorRT lowering needs torch_tensorrt ({exc})") from None
        register, registry = register_torch_trt_decomposition, TORCH_TRT_DECOMPOSITIONS
    for op, decomposition in INFERENCE_DECOMPOSITIONS.items():
        register(op, registry=registry)(decomposition)
    return dict(INFERENCE_DECOMPOSITIONS)


__all__ = ["register_torch_tensorrt_decompositions"]
