"""The training curve: loss per step and the validation metric, with axes and ticks (matplotlib)."""

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
        ax.legend(lines, [h.get_label() for h in lines], loc="center right", fontsize=8)
    ax.set_title("training curve")
    fig.tight_layout()
    path = atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


__all__ = ["read_log", "training_curve"]
