"""rexfast's functional ops, one folder each (see ``rexfast/ops/README.md``).

Each op has a PyTorch reference and fused backends behind a per-op registry
(:mod:`rexfast.ops.registry`); ``backend=`` or ``REXFAST_BACKEND`` pins one.
"""

from . import registry
from .group_assign import group_assign, group_assign_reference
from .gumbel import gumbel_noise
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from .region_attention.region_image_attention import region_image_attention, region_image_attention_reference
from .region_attention.region_language_attention import (region_language_attention,
                                                          region_language_attention_reference)

__all__ = ["registry", "group_assign", "group_assign_reference", "gumbel_noise", "ms_deform_attn",
           "ms_deform_attn_reference", "region_image_attention", "region_image_attention_reference",
           "region_language_attention", "region_language_attention_reference"]
