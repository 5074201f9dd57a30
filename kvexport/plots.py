"""Figures for the reports: matplotlib without a display, each figure rendered to PNG bytes (the
reports write them atomically, beside their JSON and markdown)."""

from __future__ import annotations

import io


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (imported on first use: plotting is optional work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """Lay out ``fig``, render it as PNG (120 dpi) and close it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    pyplot().close(fig)
    return buf.getvalue()
