"""The token-length histogram of `ftcluster data stats`, as a PNG.

Drawn on a bare matplotlib Figure with the Agg canvas: no pyplot, so no global figure state and no
display backend is ever looked for (the command runs on headless login nodes).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ftcluster.util.atomic import replacing


def plot_lengths(lengths: dict[str, list[int]], limit: int, title: str, png: Path) -> None:
    """One histogram per split on shared bins, the length limit marked."""
    # Whole-token bins, at most 60 of them, spanning the data and the limit so its line is in view.
    low = min(min(min(v) for v in lengths.values()), limit)
    high = max(max(max(v) for v in lengths.values()), limit) + 1
    width = max(1, math.ceil((high - low) / 60))
    bins = np.arange(low, high + width, width)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)} examples)")
    over = sum(int((np.asarray(v) > limit).sum()) for v in lengths.values())
    ax.axvline(limit, color="black", linestyle="--", label=f"limit {limit} ({over} over)")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend()
    with replacing(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
