"""The region-attention family: ReLA's two decoder attentions, one flash-style
masked-attention core with a mask "decider" per op.

The shared semantics and machinery live here; each op is a folder beside them
with the same files as every other op (``op.py``, ``reference.py``,
``decomposition.py``):

* :mod:`.core` — the attention core in PyTorch (masked scores, softmax, its
  backward) and the NaN semantics every backend of both ops computes;
* :mod:`.mask` — the official RIA mask, as the authors' decoder builds it;
* :mod:`.plan` — how fused kernels repeat that decision without a mask (the
  per-device resampler plans, their once-per-device checks, the kernels' plan
  arguments);
* :mod:`.checks` — the q, k, v and scale checks both ops make;
* :mod:`.triton_kernels` — the Triton kernels of both ops and their host
  wrappers (imports triton; each op registers them through
  :func:`rexfast.ops.common.lazy`, which imports the module on the first Triton call);
* :mod:`.region_image_attention` (RIA: masked by region logits) and
  :mod:`.region_language_attention` (RLA: an optional key padding mask).

Native kernels: ``csrc/cpu/region_attention/`` (the shared C++ core),
``csrc/cpu/region_{image,language}_attention.cpp``,
``csrc/cuda/region_attention_glue.h`` with ``csrc/cuda/region_{image,language}_attention.cu``,
and ``kernels/region_attention.cu(h)``.
"""
