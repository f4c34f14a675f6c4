"""Every op's inference decomposition, keyed by its registered ``torch.library`` op.

Each op folder holds ``decomposition.py``: the op's forward at inference in
plain PyTorch, with the op's decisions (argmax winners, attention masks) and
NaN semantics, written with operations exporters and TensorRT take. It is the
single source of truth for the export paths:

* ``torch.export`` programs lower to it with
  ``ep.run_decompositions(INFERENCE_DECOMPOSITIONS)`` (plain aten graphs, no
  ``rexfast::`` ops: what torch-TensorRT and other aten consumers take;
  :mod:`rexfast.tensorrt` registers these with torch-TensorRT);
* the onnxscript functions of :mod:`rexfast.export.onnx_functions` compute the
  same thing operation for operation, for ONNX.

Each entry takes the registered op's arguments (``backend`` and the noise
arguments included) and returns its outputs.
"""

from __future__ import annotations

import torch

from . import group_assign as _ga  # noqa: F401  (registers the custom ops)
from . import ms_deform_attn as _msda  # noqa: F401
from .region_attention import region_image_attention as _ria  # noqa: F401
from .region_attention import region_language_attention as _rla  # noqa: F401
from .group_assign.decomposition import decompose_registered as _group_assign
from .ms_deform_attn.decomposition import decompose_registered as _ms_deform_attn
from .region_attention.region_image_attention.decomposition import decompose_registered as _region_image_attention
from .region_attention.region_language_attention.decomposition import (
    decompose_registered as _region_language_attention)

INFERENCE_DECOMPOSITIONS = {
    torch.ops.rexfast.group_assign.default: _group_assign,
    torch.ops.rexfast.ms_deform_attn.default: _ms_deform_attn,
    torch.ops.rexfast.region_image_attention.default: _region_image_attention,
    torch.ops.rexfast.region_language_attention.default: _region_language_attention,
}

__all__ = ["INFERENCE_DECOMPOSITIONS"]
