"""PNG plots of a bench run (needs matplotlib: ``pip install -e .[bench]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scheduler.trace import RESOURCES, busy_seconds


def plot_timeline(trace: dict[str, Any], png: Path, engine: str = "offload-train") -> Path:
    """One row per resource: when it was busy during the traced step, and its busy share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    t0_us = min(e["ts"] for e in events)
    t1_us = max(e["ts"] + e["dur"] for e in events)
    span_s = (t1_us - t0_us) / 1e6
    busy = busy_seconds(events)
    rows = [r for r in RESOURCES if r in busy]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.5))
    for y, resource in enumerate(rows):
        bars = [((e["ts"] - t0_us) / 1e6, max(e["dur"] / 1e6, span_s / 2000))
                for e in events if e["cat"] == resource]
        ax.broken_barh(bars, (y - 0.35, 0.7), color=f"C{y}")
        ax.text(span_s * 1.01, y, f"{busy[resource]:.2f} s ({busy[resource] / span_s:.0%})", va="center",
                fontsize=8)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlim(0, span_s * 1.18)
    ax.set_xlabel("seconds from the start of the traced step")
    ax.set_title(f"{engine}: busy time per resource over one step (busy s, share of the step)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_losses(losses: dict[str, list[float]], png: Path) -> Path:
    """The loss per step of each engine (they should lie on top of each other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    markers = ["o", "x", "+", "s"]
    for k, (engine, values) in enumerate(losses.items()):
        ax.plot(range(len(values)), values, marker=markers[k % len(markers)], label=engine,
                linestyle="-" if k == 0 else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss per step, same init and batches (fp32)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
