"""Exact-match evaluation of a run against its baselines, as a results JSON and a Markdown table.

Systems, all on the same rows and decoding settings: the base alone, the expert alone, Co-LLM at the run's
threshold, random deferral at the rate Co-LLM actually deferred (does the head pick *where* to defer, or
only *how often*?), and any other runs given (a weak-supervision head, a fine-tuned base). A system that
cannot be run here gets a row that says why, never a made-up number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from collm.atomic import write_json, write_text
from collm.core.request import Request
from collm.core.routing import most_probable_expert
from collm.core.seed import check_seed
from collm.data.answer import is_correct, normalize_number
from collm.decoding.provenance import token_pieces
from collm.errors import CollmError
from collm.evaluation.report import system_table

_NUMBER_PUNCT = {".", ","}
PROXY_TUNING_NOTE = "not run: needs an SFT run (--sft-run) for the tuned small model"


@dataclass
class EvalConfig:
    """How `evaluate` decodes; saved in the results JSON."""

    max_new_tokens: int = 256
    """Most new tokens per answer."""
    batch_size: int = 8
    """Prompts decoded together."""
    threshold: float | None = None
    """Co-LLM's deferral threshold; None: the run's own (from collm.json)."""
    limit: int | None = None
    """Evaluate only the first `limit` rows (None: all)."""
    seed: int = 0
    """Seeds the random-deferral baseline (and sampling, were it on)."""
    stop: list[str] = field(default_factory=list)
    """Stop string (repeatable): an answer ends before the first of them."""
    chat: bool = True
    """Wrap prompts in the base's chat template, as `collm.data.rows` does for training."""
    lookahead: int = 1
    """Draft past deferrals, up to this many tokens per check (Co-LLM's and the expert's rows; 1: no drafting)."""
    rewind: float = 0.0
    """Co-LLM's rows: the expert re-writes a base token it gives a probability below this (0: off)."""
    yield_below: float = 0.0
    """Co-LLM's rows: the base's token stands where the expert's own is less probable than this (0: off)."""
    max_rewinds: int = 8
    """Most rewinds per answer."""

    def __post_init__(self):
        self.stop = tuple(self.stop)
        Request(lookahead=self.lookahead, rewind=self.rewind, yield_below=self.yield_below,
                max_rewinds=self.max_rewinds)  # checks them
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise CollmError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise CollmError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.limit is not None and self.limit <= 0:
            raise CollmError(f"limit must be positive, got {self.limit}")
        check_seed(self.seed)


@dataclass
class EvalRun:
    """What `collm eval` evaluates and where it writes its results (how it decodes: EvalConfig)."""

    run: str
    """Trained run folder (collm.json) to evaluate, or a shipped run by name."""
    data: str
    """JSONL with "prompt" and "answer" per line."""
    html: str | None = None
    """Write a self-contained HTML report here."""
    json_out: str | None = field(default=None, metadata={"flag": "--json"})
    """Write results with every answer as JSON here."""
    markdown: str | None = None
    """Write the summary table as Markdown here."""
    weak_run: str | None = None
    """Run whose head was trained by weak supervision (a comparison row)."""
    sft_run: str | None = None
    """Run with a fine-tuned base, decoded alone (a comparison row)."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""
    dtype: str | None = None
    """float32, bfloat16 or float16. Default: the run's."""


@dataclass
class SystemResult:
    """One row of the table, with the per-example outputs behind it."""

    name: str
    correct: int = 0
    total: int = 0
    accuracy: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    defer_rate: float | None = None
    expert_calls: int | None = None
    share_in_numbers: float | None = None
    """Of the tokens an expert wrote, the share inside numbers (digits, or '.'/',' between digits)."""
    new_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float | None = None
    threshold: float | None = None
    note: str = ""
    """Why the row has no numbers, or how it was made (e.g. the random rate)."""
    examples: list[dict] = field(default_factory=list)


def read_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """JSONL rows with at least "prompt" and "answer"; CollmError naming the line otherwise."""
    from collm.data.rows import read_jsonl

    rows = read_jsonl(path, _check_row)
    return rows[:limit] if limit else rows


def _check_row(row: object, where: str) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
        raise CollmError(f"{where} needs a string \"prompt\" and an \"answer\"")


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; unlike p ± z·se it stays in [0, 1] and works at 0 or n."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def random_router(rate: float, seed: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A router (see `collm.core.request.Router`) that defers each token with probability `rate`, seeded."""
    generator: dict[str, torch.Generator] = {}

    def route(step: int, log_pz: torch.Tensor) -> torch.Tensor:
        if "g" not in generator:  # created on first use, on the device the head runs on
            generator["g"] = torch.Generator(device=log_pz.device).manual_seed(seed)
        defer = torch.rand(log_pz.shape[0], generator=generator["g"], device=log_pz.device) < rate
        return torch.where(defer, most_probable_expert(log_pz), 0)

    return route


def check_prompts_fit(pair, rows: list[dict], config: EvalConfig) -> None:
    """Refuse, before decoding anything, rows whose prompt plus max_new_tokens exceed a model's context
    (counted), as collm score and train refuse rows longer than the context."""
    from collm.backends.models import context_length

    limits = [(context_length(m), name) for m, name in
              [(pair.base, "base"), *((e, f"expert {k}") for k, e in enumerate(pair.experts, 1))]]
    limits = [(limit, name) for limit, name in limits if limit]
    if not limits:
        return
    limit, who = min(limits)
    lengths = [len(ids) for ids in pair.encode([row["prompt"] for row in rows], chat=config.chat)]
    long = [n for n in lengths if n + config.max_new_tokens > limit]
    if long:
        raise CollmError(f"{len(long)} of {len(rows)} rows have a prompt that with --max-new-tokens "
                         f"{config.max_new_tokens} exceeds the {who}'s context of {limit} tokens (longest prompt "
                         f"{max(long)}): lower --max-new-tokens or remove those rows")


def run_system(pair, rows: list[dict], name: str, config: EvalConfig, *, mode: str = "collm",
               threshold: float | None = None, router=None) -> SystemResult:
    """Decode every row with one system and score it by exact match of the final answer."""
    result = SystemResult(name, threshold=threshold if mode == "collm" else None)
    deferred = calls = 0
    for start in range(0, len(rows), config.batch_size):
        batch = rows[start:start + config.batch_size]
        out = pair.generate([row["prompt"] for row in batch], max_new_tokens=config.max_new_tokens,
                            threshold=threshold, seed=config.seed, mode=mode, stop=list(config.stop) or None,
                            chat=config.chat, router=router,
                            lookahead=config.lookahead if mode in ("collm", "expert") else 1,
                            **(dict(rewind=config.rewind, yield_below=config.yield_below,
                                    max_rewinds=config.max_rewinds) if mode == "collm" and router is None else {}))
        stats = out.stats
        deferred += stats.get("deferred_tokens", 0)
        calls += stats.get("expert_calls", 0)
        result.new_tokens += stats.get("new_tokens", 0)
        result.seconds += stats.get("seconds", 0.0)
        for i, row in enumerate(batch):
            result.examples.append(_example(pair, row, out, i))
    result.total = len(result.examples)
    result.correct = sum(example["correct"] for example in result.examples)
    result.accuracy = result.correct / result.total
    result.ci_low, result.ci_high = wilson_interval(result.correct, result.total)
    result.defer_rate = deferred / result.new_tokens if result.new_tokens else 0.0
    result.expert_calls = calls
    if mode in ("collm", "compose") and deferred:
        result.share_in_numbers = deferral_summary(asdict(result))["share_in_numbers"]
    result.tokens_per_s = result.new_tokens / result.seconds if result.seconds > 0 else None
    return result


def _example(pair, row: dict, out, i: int) -> dict:
    tokenizer = pair.tokenizer
    pieces = token_pieces(tokenizer, out.token_ids[i]) if tokenizer is not None else [str(t) for t in out.token_ids[i]]
    return {"prompt": row["prompt"], "answer": normalize_number(str(row["answer"])) or str(row["answer"]),
            "text": out.texts[i], "correct": is_correct(out.texts[i], row["answer"]), "tokens": pieces,
            "sources": out.sources[i], "defer_probs": [round(p, 4) for p in out.defer_probs[i]]}


def in_number(pieces: list[str], i: int) -> bool:
    """Whether token i is part of a number: digits, or a '.'/',' between digits."""
    piece = pieces[i].strip()
    if piece.isdigit():
        return True
    if piece in _NUMBER_PUNCT and 0 < i < len(pieces) - 1:
        return pieces[i - 1][-1:].isdigit() and pieces[i + 1][:1].isdigit()
    return False


def deferral_summary(system: dict) -> dict:
    """Deferral rate and the share of deferred tokens that lie inside numbers, from a system's examples."""
    tokens = deferred = inside = 0
    for example in system.get("examples", []):
        pieces, sources = example["tokens"], example["sources"]
        tokens += len(sources)
        for i, source in enumerate(sources):
            if source:
                deferred += 1
                inside += in_number(pieces, i)
    return {"tokens": tokens, "deferred": deferred, "defer_rate": deferred / tokens if tokens else 0.0,
            "deferred_in_numbers": inside, "share_in_numbers": inside / deferred if deferred else 0.0}


def missing(name: str, note: str) -> SystemResult:
    """A row for a system that could not be run, saying why."""
    return SystemResult(name, note=note)


def evaluate(pair, rows: list[dict], config: EvalConfig, *, weak_run: str | Path | None = None,
             sft_run: str | Path | None = None, load_run: Callable[[str], Any] | None = None) -> dict:
    """Results for base, expert, Co-LLM, random deferral, and the comparison runs.

    `weak_run`: a run whose head was trained on weak (pseudo-label) supervision, decoded as Co-LLM at its own
    threshold. `sft_run`: a run with a fine-tuned base, decoded as the base alone. `load_run` loads a run
    folder (default `CoLLM.from_pretrained`).
    Returns the dict `save_results` writes and `collm.evaluation.report` shows.
    """
    check_prompts_fit(pair, rows, config)
    threshold = pair.threshold if config.threshold is None else config.threshold
    systems = [run_system(pair, rows, "base alone", config, mode="base"),
               run_system(pair, rows, "expert alone", config, mode="expert"),
               run_system(pair, rows, "Co-LLM", config, threshold=threshold)]
    weights = getattr(pair, "info", {}).get("base_weights", "original")
    if weights != "original":  # Co-LLM training tuned it: it is not the untuned model, and may lean on the expert
        systems[0].note = f"the run's own base, trained with the head ({weights}), decoding without the expert"
    rate = systems[-1].defer_rate or 0.0
    randomised = run_system(pair, rows, "random deferral", config, router=random_router(rate, config.seed))
    randomised.note = f"each token deferred with probability {rate:.3f} (Co-LLM's measured rate)"
    systems.append(randomised)
    load_run = load_run or _load_run
    loaded = {}
    for name, folder, mode in (("Co-LLM, weak-supervision head", weak_run, "collm"),
                               ("SFT base alone", sft_run, "base")):
        if folder is None:
            systems.append(missing(name, "not run: no run folder given"))
            continue
        other = loaded[mode] = load_run(str(folder))
        if mode == "base" and _same_base(pair, folder):  # decoding it again would repeat "base alone" exactly
            result = replace(systems[0], name=name, note=f"run {folder}: the same model as base alone (this "
                             "run's base is that run's tuned base, frozen)")
        else:
            result = run_system(other, rows, name, config, mode=mode, threshold=other.threshold)
            result.note = f"run {folder}"
        systems.append(result)
    systems.append(_proxy_system(pair, loaded.get("base"), rows, config))
    return {"config": asdict(config), "threshold": threshold, "rows": len(rows),
            "systems": [asdict(s) for s in systems]}


def _same_base(pair, sft_run: str | Path) -> bool:
    """Whether `pair` decodes with the untouched base of the SFT run `sft_run` (its adapter folder, or its full
    weights), so that the SFT base alone is the pair's base alone."""
    spec = getattr(pair, "specs", {}).get("base")
    if getattr(pair, "info", {}).get("base_weights", "original") != "original" or not spec:
        return False
    base = Path(spec).resolve()
    return any(base == (Path(sft_run) / sub).resolve() for sub in ("base_adapter", "base"))


def _proxy_system(pair, sft_pair, rows: list[dict], config: EvalConfig) -> SystemResult:
    """Proxy tuning, as the paper compares: the expert + (SFT base - the untuned base it started from)."""
    if sft_pair is None:
        return missing("proxy tuning", PROXY_TUNING_NOTE)
    from collm.backends.models import DTYPES, load_model
    from collm.pair import proxy_tuning

    original = sft_pair.info.get("base")
    if not original or sft_pair.info.get("base_weights", "original") == "original":
        return missing("proxy tuning", "not run: the SFT run does not record a tuned base and its original")
    weight = next(sft_pair.base.parameters())
    # the untuned base in the tuned one's dtype as loaded (collm.json's dtype is the training dtype, which a
    # --dtype bfloat16 evaluation overrides): the two halves of the shift are computed alike
    dtype = next(name for name, value in DTYPES.items() if value == weight.dtype)
    untuned, _ = load_model(original, device=weight.device, dtype=dtype)
    proxy = proxy_tuning(pair.experts[0], sft_pair.base, untuned, pair.tokenizer)
    result = run_system(proxy, rows, "proxy tuning", config, mode="proxy")
    result.note = f"expert + SFT base - untuned {original}"
    return result


def _load_run(folder: str):
    from collm.pair import CoLLM

    return CoLLM.from_pretrained(folder)


def markdown_table(results: dict, footnotes: bool = False) -> str:
    """The systems as a Markdown table; rows without numbers show their note instead. Notes go in a last
    column, or with ``footnotes`` below the table (narrow enough for a terminal)."""
    return system_table(results, ("accuracy", "ci", "defer", "share", "calls", "speed"), footnotes=footnotes)


def save_results(results: dict, json_path: str | Path | None = None, markdown_path: str | Path | None = None) -> None:
    """Write the results JSON (with every example) and/or the Markdown table, atomically."""
    if json_path is not None:
        write_json(json_path, results)
    if markdown_path is not None:
        table = markdown_table(results)
        write_text(markdown_path, table)


def evaluate_run(run: str | Path, data: str | Path, config: EvalConfig, *, weak_run=None, sft_run=None,
                 json_path=None, markdown_path=None, html_path=None, device: str = "cpu",
                 dtype: str | None = None) -> dict:
    """Load a run, evaluate it on a JSONL file, and write whichever of JSON, Markdown and HTML are asked for.

    The HTML embeds the run's calibration plot when its collm.json records a calibration.
    """
    from collm.pair import CoLLM

    rows = read_rows(data, config.limit)
    pair = CoLLM.from_pretrained(run, device=device, dtype=dtype)
    results = evaluate(pair, rows, config, weak_run=weak_run, sft_run=sft_run,
                       load_run=lambda folder: CoLLM.from_pretrained(folder, device=device, dtype=dtype))
    results["run"], results["data"] = str(run), str(data)
    save_results(results, json_path, markdown_path)
    if html_path is not None:
        from collm.evaluation.plots import calibration_png
        from collm.evaluation.report import write_html

        write_html(html_path, results, calibration_png(pair.info.get("calibration")))
    return results
