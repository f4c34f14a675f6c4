"""The figures rexfast writes, with matplotlib: the training curve (loss per step and the
validation metric, with axes and ticks) and the demo's examples (image, truth, prediction)."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write


def read_log(log_path: Path) -> list[dict]:
    if not Path(log_path).is_file():
        return []
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]


def training_curve(log_path: Path, png_path: Path, *, metric: str = "gIoU") -> Path | None:
    """Draw ``log.jsonl``'s training loss (left axis) and validation ``metric``
    (right axis, every evaluation; subset evaluations and full ones marked
    apart) against the optimizer step. Returns the PNG path, None without data."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r[metric], r.get("subset")) for r in records if r.get("kind") == "eval" and metric in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    ax.plot([s for s, _ in train], [v for _, v in train], color="tab:blue", linewidth=1.2, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.tick_params(axis="y", labelcolor="tab:blue")
    ax.grid(True, alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        ax2.plot([s for s, _, _ in evals], [v for _, v, _ in evals], color="tab:red", marker="o", markersize=3.5,
                 linewidth=1.2, label=f"validation {metric}")
        full = [(s, v) for s, v, subset in evals if subset is None]
        if full and len(full) < len(evals):
            ax2.scatter([s for s, _ in full], [v for _, v in full], s=40, facecolors="none", edgecolors="black",
                        zorder=3, label="full validation split")
        ax2.set_ylabel(f"validation {metric} (%)", color="tab:red")
        ax2.tick_params(axis="y", labelcolor="tab:red")
        ax2.set_ylim(0, 100)
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [h.get_label() for h in lines], loc="center right", fontsize=10)
    ax.set_title("training curve")
    fig.tight_layout()
    path = atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


# The outline of the referred pixels: bright cyan, far from every colour a synthetic scene uses (red,
# green, blue, yellow and purple shapes on grey; rexfast.data.synthetic.COLORS) and unlike
# the magenta the shapes' purple resembles.
MASK_COLOUR = (0.0, 0.9, 1.0)


def _highlighted(image, mask, dim: float = 0.3):
    """``image`` as floats in [0, 1] with every pixel outside ``mask`` darkened to ``dim`` of its
    value: the referred pixels keep their own colour (a tint would turn a blue shape cyan and a
    yellow one green), and the cyan outline drawn around them stands out on the dark rest. An
    empty mask leaves the image as it is."""
    import numpy as np

    pixels = np.asarray(image, dtype=np.float32) / 255.0
    if not mask.any():
        return pixels
    out = pixels * dim
    out[mask] = pixels[mask]
    return out


def example_figure(image, truth, prediction, sentence: str, truth_label: str, prediction_label: str,
                   png_path: Path) -> Path:
    """Three panels, image | truth | prediction, the referred pixels outlined in cyan and the rest darkened,
    the sentence as the title, what the truth and the prediction say under their panels, and a
    legend; fonts readable at the PNG's size. ``image`` uint8 (H, W, 3); masks bool (H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.9), dpi=100)
    h, w = truth.shape
    panels = ((f"{w} x {h} pixels", image, None), (truth_label, _highlighted(image, truth), truth),
              (prediction_label, _highlighted(image, prediction), prediction))
    for ax, (label, shown, mask) in zip(axes, panels):
        ax.imshow(shown, interpolation="nearest")
        if mask is not None and mask.any() and not mask.all():
            ax.contour(mask.astype(float), levels=[0.5], colors=[MASK_COLOUR], linewidths=2.0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(label, fontsize=12)
    axes[0].set_title("image", fontsize=12)
    axes[1].set_title("truth", fontsize=12)
    axes[2].set_title("prediction", fontsize=12)
    fig.suptitle(f"\u201c{sentence}\u201d", fontsize=14)
    fig.legend(handles=[Patch(facecolor="none", edgecolor=MASK_COLOUR, linewidth=2.0,
                              label="outlined: the pixels the sentence refers to (the rest darkened)")],
               loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=1, fontsize=11, frameon=False)
    fig.tight_layout(rect=(0, 0.11, 1, 0.95))
    path = atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


__all__ = ["MASK_COLOUR", "example_figure", "read_log", "training_curve"]
