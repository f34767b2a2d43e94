"""Plots, drawn one way: matplotlib without a display (Agg), for `compare` and the demo's report alike."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed; works on a server or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_image(fig: Any, dpi: int = 100) -> Image.Image:
    """A matplotlib figure as an RGB PIL image (the figure is closed)."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as im:
        return im.convert("RGB")
