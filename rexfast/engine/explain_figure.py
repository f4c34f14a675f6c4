"""The "what the model grouped" figure for one explained answer (matplotlib), shared by
``rexfast predict --explain`` and the web page's Explain tab.

* CGFormer (:class:`~rexfast.models.explain.TokenGrouping`), as the seed paper's Figure 5:
  one row per decoder stage (coarse to fine), one column per token; each panel shows the
  pixels that token claimed at that stage over the dimmed image, the referent token's
  column framed in the overlay colour. The first column colours the whole partition.
* ReLA (:class:`~rexfast.models.explain.RegionMinimap`), as the GRES paper's Figure 7:
  the √Q×√Q minimap σ(w_q) with its strongest cells outlined, the target-vs-background
  logit Σ_q w_q M_r[q] the mask is thresholded from, and the strongest regions' masks
  weighted by the minimap, σ(w_q)·σ(M_r[q]).

Every panel sits on the image the answer was computed on (shown at most
``MAX_SIDE`` pixels wide, nearest-neighbour maps stretched over it: the maps are the
model's own resolution, 1/16 to 1/4 of its input).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..io import atomic_write
from .segmenter import OVERLAY_COLOUR, Segmentation, overlay_pixels

MAX_SIDE = 384  # the image is drawn at most this many pixels on its longer side
STRONGEST = 4  # ReLA: how many region masks the figure shows
TOKEN_COLOURS = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74),
                 (0.55, 0.34, 0.29), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13))
REFERENT_COLOUR = tuple(c / 255 for c in OVERLAY_COLOUR)


def _display_image(result: Segmentation, image) -> np.ndarray:
    """uint8 (h, w, 3): the image (given, or the one the result holds) scaled to at most MAX_SIDE."""
    from PIL import Image

    from .segmenter import _as_pil

    image = result.image if image is None else image
    if image is None:
        raise ValueError("image is needed: this result does not hold the image it was computed on")
    pil = _as_pil(image, "image")
    if (pil.height, pil.width) != result.size:
        raise ValueError(f"image is {pil.width}×{pil.height} but the result is {result.size[1]}×{result.size[0]} "
                         "(width × height)")
    scale = min(1.0, MAX_SIDE / max(pil.size))
    if scale < 1.0:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


def _mask_at(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if mask.shape == size:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)) > 127


def _show(ax, image: np.ndarray, title: str, *, dim: float = 1.0):
    ax.imshow((image.astype(np.float32) * dim).astype(np.uint8), interpolation="bilinear")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _layer(ax, rgba: np.ndarray, image: np.ndarray, interpolation: str = "nearest"):
    """Stretch an (h, w, 4) map over the image drawn in ``ax``."""
    h, w = image.shape[:2]
    ax.imshow(rgba, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation=interpolation)


def _frame(ax, colour, width: float = 3.0):
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def _answer_title(result: Segmentation) -> str:
    if result.no_target:
        p = "" if result.no_target_prob is None else f" (p={result.no_target_prob:.2f})"
        return f"answer: no target{p}"
    return f"answer: {100.0 * result.mask.mean():.1f}% of the image"


def _grouping_figure(result: Segmentation, image: np.ndarray):
    import matplotlib.pyplot as plt

    grouping = result.internals
    stages = [np.asarray(s) for s in grouping.stages]
    n = grouping.num_tokens
    cols = max(3, n + 1)
    rows = 1 + len(stages)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.1 * rows + 0.5), dpi=100, squeeze=False)
    h, w = image.shape[:2]
    _show(axes[0, 0], image, "image")
    _show(axes[0, 1], overlay_pixels(image, _mask_at(result.mask, (h, w))), _answer_title(result))
    axes[0, 2].imshow(result.probability, cmap="magma", vmin=0.0, vmax=1.0, interpolation="bilinear",
                      extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    axes[0, 2].set_title(f"mask probability (> {result.mask_threshold:.2f})", fontsize=8)
    axes[0, 2].set_xticks([])
    axes[0, 2].set_yticks([])
    for ax in axes[0, 3:]:
        ax.axis("off")
    colours = [REFERENT_COLOUR if i == grouping.referent else TOKEN_COLOURS[i % len(TOKEN_COLOURS)] for i in range(n)]
    for s, stage in enumerate(stages):
        row = axes[1 + s]
        winner = stage.argmax(axis=0)
        partition = np.zeros(winner.shape + (4,), dtype=np.float32)
        for i in range(n):
            partition[winner == i, :3] = colours[i]
        partition[..., 3] = 0.55
        _show(row[0], image, f"stage {s + 1} ({stage.shape[1]}×{stage.shape[2]}): all tokens", dim=0.9)
        _layer(row[0], partition, image)
        for i in range(n):
            ax = row[1 + i]
            claimed = stage[i] > 0.5
            layer = np.zeros(claimed.shape + (4,), dtype=np.float32)
            layer[claimed, :3] = colours[i]
            layer[claimed, 3] = 0.7
            share = 100.0 * claimed.mean()
            name = grouping.token_names[i]
            _show(ax, image, f"{'★ ' if i == grouping.referent else ''}{name}: {share:.0f}% of pixels", dim=0.55)
            _layer(ax, layer, image)
            if i == grouping.referent:
                _frame(ax, REFERENT_COLOUR)
        for ax in row[1 + n:]:
            ax.axis("off")
    fig.suptitle(f"CGFormer: which token claimed each pixel, per decoder stage — {result.text!r}", fontsize=9)
    return fig


def _minimap_figure(result: Segmentation, image: np.ndarray):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    record = result.internals
    k = min(STRONGEST, record.num_regions)
    top = record.strongest(k)
    cols = max(4, k)
    fig, axes = plt.subplots(2, cols, figsize=(2.3 * cols, 2 * 2.5 + 0.5), dpi=100, squeeze=False)
    h, w = image.shape[:2]
    _show(axes[0, 0], image, "image")
    _show(axes[0, 1], overlay_pixels(image, _mask_at(result.mask, (h, w))), _answer_title(result))
    g = record.grid
    minimap = record.minimap
    ax = axes[0, 2]
    ax.imshow(minimap, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    for q in top:
        r, c = divmod(int(q), g)
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=REFERENT_COLOUR, linewidth=2))
    if g <= 10:
        for r in range(g):
            for c in range(g):
                v = minimap[r, c]
                ax.text(c, r, f"{v:.1f}"[1:] if v < 1 else "1", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 else "black")
    ax.set_title(f"minimap {g}×{g}: σ(w_q)", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    logit = record.target_logit
    bound = float(np.abs(logit).max()) or 1.0
    ax = axes[0, 3]
    ax.imshow(logit, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest",
              extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    ax.set_title("Σ_q w_q·M_q (> 0: target)", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for ax in axes[0, 4:]:
        ax.axis("off")
    weighted = record.weighted_regions(top)
    # one colour scale for the shown regions (their largest value), so that they compare
    scale = float(weighted.max()) if weighted.size and weighted.max() > 0 else 1.0
    cmap = plt.get_cmap("magma")
    for j, q in enumerate(top):
        ax = axes[1, j]
        value = weighted[j] / scale
        layer = cmap(value).astype(np.float32)
        layer[..., 3] = 0.1 + 0.85 * value
        r, c = divmod(int(q), g)
        _show(ax, image, f"region ({r},{c}): σ(w)={minimap[r, c]:.2f}", dim=0.6)
        _layer(ax, layer, image, interpolation="bilinear")
    axes[1, 0].set_ylabel(f"σ(w)·σ(M), max {scale:.2f}", fontsize=8)
    for ax in axes[1, k:]:
        ax.axis("off")
    fig.suptitle(f"ReLA: the strongest region masks, weighted by the minimap — {result.text!r}", fontsize=9)
    return fig


def explain_figure(result: Segmentation, image=None):
    """A matplotlib Figure of ``result.internals`` (see the module docstring); ``image``
    defaults to the one the result was computed on. The caller closes it
    (``matplotlib.pyplot.close(fig)``); :func:`explain_png` and :func:`save_explain_figure` do."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from rexfast.models.explain import RegionMinimap, TokenGrouping

    if not isinstance(result, Segmentation):
        raise TypeError(f"result must be a rexfast Segmentation, got {type(result).__name__}")
    if result.internals is None:
        raise ValueError("this result holds no internals: compute it with explain=True "
                         "(Segmenter(..., explain=True) or seg(image, text, explain=True))")
    pixels = _display_image(result, image)
    if isinstance(result.internals, TokenGrouping):
        fig = _grouping_figure(result, pixels)
    elif isinstance(result.internals, RegionMinimap):
        fig = _minimap_figure(result, pixels)
    else:
        raise TypeError(f"no figure for internals of type {type(result.internals).__name__}")
    fig.tight_layout()
    return fig


def explain_png(result: Segmentation, image=None) -> bytes:
    """:func:`explain_figure` as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = explain_figure(result, image)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def save_explain_figure(result: Segmentation, path, image=None) -> Path:
    """Write :func:`explain_figure` as a PNG, atomically."""
    data = explain_png(result, image)
    return atomic_write(path, lambda f: f.write(data))


__all__ = ["explain_figure", "explain_png", "save_explain_figure", "MAX_SIDE", "STRONGEST"]
