"""The calibration plot (accuracy against deferral rate), drawn for `collm calibrate` and embedded in the HTML
report of `collm eval`: it reads calibration records, so it depends on neither stage."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace


def plot(points: list, levels: dict[str, float], path: str | Path, chosen=None) -> None:
    """PNG of accuracy against deferral rate, thresholds labelled, baselines as horizontal lines. ``points``:
    objects with ``threshold``, ``defer_rate`` and ``accuracy`` (collm.evaluation.calibrate.Point)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ordered = sorted(points, key=lambda p: p.defer_rate)
    ax.plot([p.defer_rate for p in ordered], [p.accuracy for p in ordered], "o-", color="#1f77b4", label="Co-LLM")
    labels: dict[tuple[float, float], list[str]] = {}
    for p in points:  # thresholds that landed on the same point share one label
        labels.setdefault((p.defer_rate, p.accuracy), []).append(f"{p.threshold:g}")
    for xy, names in labels.items():
        ax.annotate(", ".join(names), xy, textcoords="offset points", xytext=(4, 4), fontsize=7)
    for (name, level), color in zip(levels.items(), ("#2ca02c", "#d62728")):
        if level is not None:
            ax.axhline(level, linestyle="--", color=color, label=f"{name} ({level:.2f})")
    if chosen is not None:
        ax.plot([chosen.defer_rate], [chosen.accuracy], "*", markersize=14, color="#ff7f0e",
                label=f"chosen threshold {chosen.threshold:g}")
    ax.set_xlabel("deferral rate (fraction of tokens the expert writes)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_xlim(-0.03, 1.08)  # room for the labels of points at rate 1
    ax.set_ylim(*_accuracy_range([p.accuracy for p in points] + [v for v in levels.values() if v is not None]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save_figure(fig, Path(path))
    plt.close(fig)


def _accuracy_range(values: list[float]) -> tuple[float, float]:
    # Zoom on the measured band, but never to less than 0.1 wide: flat curves would show float noise.
    low, high = min(values), max(values)
    pad = max(0.05, (0.1 - (high - low)) / 2)
    return max(0.0, low - pad) - 0.01, min(1.0, high + pad) + 0.01


def _save_figure(fig, path: Path) -> None:
    from collm.atomic import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def calibration_png(record: dict | None) -> bytes | None:
    """The plot for a calibration record (as saved in collm.json), as PNG bytes; None without a record."""
    if not record or not record.get("points"):
        return None
    import tempfile

    points = [SimpleNamespace(**p) for p in record["points"]]
    chosen = SimpleNamespace(**record["chosen"]) if record.get("chosen") else None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plot.png"
        plot(points, record.get("baselines", {}), path, chosen)
        return path.read_bytes()
