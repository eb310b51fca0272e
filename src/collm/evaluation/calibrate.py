"""Choose a run's deferral threshold on validation data: accuracy against deferral rate over a grid.

Each threshold in the grid decodes every validation row (batched); the choice is a pure function of the
measured points (`choose_threshold`): the most accurate threshold, or the most accurate one that defers
at most `max_defer` of the tokens. The choice is written into the run's collm.json atomically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from collm.errors import CollmError
from collm.evaluation.evaluate import EvalConfig, check_prompts_fit, run_system
from collm.evaluation.plots import plot

DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class CalibrateConfig:
    """How `calibrate` measures and chooses; saved into collm.json under "calibration"."""

    thresholds: tuple[float, ...] = field(default=DEFAULT_GRID, metadata={"parse": "floats"})
    """Thresholds to try, each in [0, 1] (comma-separated)."""
    max_defer: float | None = None
    """Largest acceptable deferral rate (fraction of tokens the expert writes); None: no budget."""
    max_new_tokens: int = 256
    """Most new tokens per answer."""
    batch_size: int = 8
    """Prompts decoded together."""
    limit: int | None = None
    """Use only the first `limit` validation rows (None: all)."""
    baselines: bool = True
    """Also measure the base alone and the expert alone (the plot's horizontal lines)."""
    lookahead: int = 1
    """Draft past deferrals, up to this many tokens per check (the same tokens, greedy; 1: no drafting)."""
    rewind: float = 0.0
    """Backtracking: the expert re-writes a base token it gives a probability below this (0: off)."""
    yield_below: float = 0.0
    """Backtracking: the base's token stands where the expert's own is less probable than this (0: off)."""
    max_rewinds: int = 8
    """Most rewinds per answer."""

    def __post_init__(self):
        self.thresholds = tuple(sorted({float(t) for t in self.thresholds}))
        if not self.thresholds or any(not 0 <= t <= 1 for t in self.thresholds):
            raise CollmError(f"thresholds must be numbers in [0, 1], got {self.thresholds}")
        if self.max_defer is not None and not 0 <= self.max_defer <= 1:
            raise CollmError(f"max_defer must be in [0, 1], got {self.max_defer}")

    def eval_config(self) -> EvalConfig:
        return EvalConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, limit=self.limit,
                          lookahead=self.lookahead, rewind=self.rewind, yield_below=self.yield_below,
                          max_rewinds=self.max_rewinds)


@dataclass
class CalibrateRun:
    """The run `collm calibrate` chooses a threshold for, its validation data, and the plot (how: CalibrateConfig)."""

    run: str
    """Trained run folder; its collm.json gets the chosen threshold."""
    data: str
    """Validation JSONL with "prompt" and "answer" per line."""
    png: str | None = None
    """Write the accuracy-vs-deferral plot here."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""
    dtype: str | None = None
    """float32, bfloat16 or float16. Default: the run's."""


@dataclass(frozen=True)
class Point:
    """What one threshold gave on the validation rows."""

    threshold: float
    accuracy: float
    defer_rate: float
    correct: int = 0
    total: int = 0


def choose_threshold(points: list[Point], max_defer: float | None = None) -> Point:
    """The most accurate point whose deferral rate is within `max_defer` (any rate when None).

    Ties go to the lower deferral rate (the expert is the costly model), then to the higher threshold.
    Raises CollmError when no point meets the budget (add threshold 1.0, which never defers, to the grid).
    """
    allowed = [p for p in points if max_defer is None or p.defer_rate <= max_defer + 1e-12]
    if not allowed:
        lowest = min((p.defer_rate for p in points), default=float("nan"))
        raise CollmError(f"no threshold defers at most {max_defer} (lowest rate measured: {lowest:.3f}); "
                         "add 1.0 to the thresholds or raise --max-defer")
    return max(allowed, key=lambda p: (p.accuracy, -p.defer_rate, p.threshold))


def sweep(pair, rows: list[dict], config: CalibrateConfig, progress=None) -> list[Point]:
    """Decode `rows` at every threshold of the grid; `progress(threshold, point)` is called after each."""
    points = []
    for threshold in config.thresholds:
        result = run_system(pair, rows, f"threshold {threshold}", config.eval_config(), threshold=threshold)
        point = Point(threshold, result.accuracy, result.defer_rate, result.correct, result.total)
        points.append(point)
        if progress is not None:
            progress(threshold, point)
    return points


def baseline_levels(pair, rows: list[dict], config: CalibrateConfig) -> dict[str, float]:
    """Accuracy of the base alone and the expert alone on the same rows."""
    levels = {}
    for name, mode in (("base alone", "base"), ("expert alone", "expert")):
        levels[name] = run_system(pair, rows, name, config.eval_config(), mode=mode).accuracy
    return levels


def write_threshold(run_dir: str | Path, threshold: float, calibration: dict) -> None:
    """Set "threshold" (and a "calibration" record) in the run's collm.json; atomic, other keys kept."""
    from collm.run import read_run_config, write_run_config

    config = read_run_config(run_dir, verify=False)  # checked when the pair was loaded
    config["threshold"] = threshold
    config["calibration"] = calibration
    write_run_config(run_dir, config)  # and re-records collm.json in the run's manifest


def calibrate(pair, run_dir: str | Path, rows: list[dict], config: CalibrateConfig,
              png: str | Path | None = None, progress=None) -> dict:
    """Sweep, choose, write the threshold into `run_dir`/collm.json, and plot; returns the record written."""
    check_prompts_fit(pair, rows, config.eval_config())
    points = sweep(pair, rows, config, progress)
    chosen = choose_threshold(points, config.max_defer)
    levels = baseline_levels(pair, rows, config) if config.baselines else {}
    record = {"config": asdict(config), "rows": len(rows), "chosen": asdict(chosen),
              "points": [asdict(p) for p in points], "baselines": levels}
    write_threshold(run_dir, chosen.threshold, record)
    if png is not None:
        plot(points, levels, png, chosen)
    return record


def calibrate_run(run: str | Path, data: str | Path, config: CalibrateConfig, png: str | Path | None = None,
                  device: str = "cpu", dtype: str | None = None, progress=None) -> dict:
    """Load a run, calibrate it on a validation JSONL file, and write the threshold into its collm.json."""
    from collm.evaluation.evaluate import read_rows
    from collm.pair import CoLLM

    rows = read_rows(data, config.limit)
    pair = CoLLM.from_pretrained(run, device=device, dtype=dtype)
    return calibrate(pair, run, rows, config, png, progress)
