"""`collm bench`: ms/token of collaborative decoding against each model alone, a naive loop and `transformers`.

Every row of one run is measured on the same machine in the same process, so ratios between rows mean
something even on a noisy shared machine; absolute numbers mean little across runs.

ms/token is the decoding phase, as the performance model counts it: each system is timed writing N tokens
and writing 1 (the prefill and the first token, reported as ``prefill_ms``), and ms/token = (t(N) - t(1)) /
(N - 1). Co-LLM's prefill includes the experts reading the prompt. ``total_ms_per_token`` = t(N) / N.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from collm.atomic import atomic_write, write_json, write_text
from collm.backends.models import DTYPES, load_model, vocab_size
from collm.backends.remote import RemoteExpert, is_remote_spec
from collm.core.head import DeferralHead
from collm.decoding.decode import Decoded, Sampling, decode
from collm.errors import CollmError

SYSTEMS = ("base", "expert", "collm", "naive", "hf_base", "hf_expert", "hf_base_static", "hf_expert_static")

# Llama shapes for random-weight benchmarks; "tiny" ones are for CPU.
SHAPES = {
    "tiny-base": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=4096),
    "tiny-expert": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=4096),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}


@dataclass
class BenchConfig:
    """What to measure."""

    base: str | None = None
    """Base model spec (folder, .gguf or embedded name); or use ``shapes``."""
    expert: str | None = None
    """Expert model spec, or a completions server ``http://HOST:PORT/v1[#MODEL]`` (then leave out the systems
    that need it in process: naive, hf_expert, hf_expert_static); or use ``shapes``."""
    shapes: str | None = "tiny-base+tiny-expert"
    """Random-weight Llama shapes BASE+EXPERT from tiny-base, tiny-expert, llama-1b, llama-8b (ignored with
    base and expert)."""
    fractions: tuple[float, ...] = field(default=(0.0, 0.05, 0.1, 0.2, 0.5, 1.0), metadata={"parse": "floats"})
    """Deferral fractions f: the benchmark router defers on exactly round(f * steps) evenly spaced steps."""
    batches: tuple[int, ...] = field(default=(1,), metadata={"parse": "ints", "flag": "--batch"})
    """Batch sizes (comma-separated)."""
    prompt_len: int = 32
    """Prompt tokens per row (random ids)."""
    new_tokens: int = 64
    """Tokens generated per row (EOS is ignored so every run writes exactly this many)."""
    repeats: int = 3
    """Timed runs per row after one warm-up run; the median is reported."""
    systems: tuple[str, ...] = field(default=SYSTEMS[:6], metadata={"parse": "names"})
    """Which systems to time (comma-separated) from base, expert, collm, naive, hf_base, hf_expert, hf_base_static,
    hf_expert_static (the static ones: transformers with a static cache, for CUDA)."""
    dtype: str = "float32"
    """Weights dtype (bfloat16 on GPU)."""
    device: str = "cpu"
    """Torch device."""
    seed: int = 0
    """Seeds the prompts, random weights and the router's phase."""
    per_row: bool = False
    """Each row of a batch defers on its own seeded phase (else all rows defer on the same steps)."""
    compile: bool = False
    """CUDA: torch.compile the static-cache steps of collm/base/expert (compile time is spent in warm-up)."""
    fused: bool = True
    """Static (CUDA) path: each step of collm/base/expert as one device program (collm.decoding.fused); False times
    the step-by-step loop on the same static caches, for comparison."""
    lookahead: tuple[int, ...] = field(default=(), metadata={"parse": "ints"})
    """Also time drafting at these lookaheads (comma-separated, each >= 2): Co-LLM drafting past deferrals
    (collm+draftK) and speculative decoding (expert+draftK: the base drafts, the expert checks)."""
    rewind: float = 0.0
    """Also time Co-LLM with rewinds (collm+rewind, and collm+draftK+rewind for each lookahead): the expert re-writes
    a base token it gives a probability below this (at most 8 per row; 0: not timed)."""
    prepack: bool = True
    """CPU: collm/base/expert/naive run large linear layers on oneDNN with prepacked weights (collm.backends.prepack);
    False times PyTorch's default kernels. The `hf_*` systems always use the defaults."""

    def __post_init__(self):
        if self.base is not None:
            self.shapes = None  # real models replace the random shapes
        if (self.base is None) != (self.expert is None):
            raise CollmError("give both --base and --expert, or --shapes")
        if self.base is None:
            parts = (self.shapes or "").split("+")
            if len(parts) != 2 or any(p not in SHAPES for p in parts):
                raise CollmError(f"--shapes must be BASE+EXPERT from {', '.join(SHAPES)}, got {self.shapes!r}")
        if any(not 0 <= f <= 1 for f in self.fractions):
            raise CollmError("deferral fractions must lie in [0, 1]")
        if any(b <= 0 for b in self.batches) or self.prompt_len <= 0 or self.repeats <= 0:
            raise CollmError("batch sizes, --prompt-len and --repeats must be positive")
        if self.new_tokens < 2:
            raise CollmError("--new-tokens must be at least 2 (ms/token is measured between 1 and N tokens)")
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown:
            raise CollmError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
        if self.dtype not in DTYPES:
            raise CollmError(f"dtype must be one of {', '.join(DTYPES)}")
        if any(not isinstance(k, int) or k < 2 for k in self.lookahead):
            raise CollmError(f"--lookahead values must be whole numbers >= 2, got {self.lookahead}")
        if isinstance(self.rewind, bool) or not isinstance(self.rewind, (int, float)) or not 0 <= self.rewind <= 1:
            raise CollmError(f"--rewind must be a probability in [0, 1], got {self.rewind!r}")
        in_process_only = sorted(set(self.systems) & {"naive", "hf_expert", "hf_expert_static"})
        if is_remote_spec(self.expert) and in_process_only:
            raise CollmError(f"systems {', '.join(in_process_only)} need the expert in process, not at "
                             f"{self.expert}; leave them out of --systems")


@dataclass
class BenchOutput:
    """Where `collm bench` writes what it measured (it always prints the table)."""

    json_out: str | None = field(default=None, metadata={"flag": "--json"})
    """Write rows and config as JSON here."""
    markdown_out: str | None = field(default=None, metadata={"flag": "--markdown"})
    """Write the table as Markdown here."""
    png: str | None = None
    """Write a plot of ms/token against f here."""


@dataclass
class Row:
    system: str
    f: float
    batch: int
    ms_per_token: float
    """Milliseconds per decoding step after the first token; each row of the batch gains one token per step."""
    prefill_ms: float | None = None
    """Milliseconds to the first token (the prompt read by every model the system runs up front)."""
    total_ms_per_token: float | None = None
    """Milliseconds for all N tokens, prefill included, divided by N."""
    ideal_ms_per_token: float | None = None
    ideal_any_row_ms_per_token: float | None = None
    """With rows deferring on their own phases (batch > 1, ``per_row``): t_base + s * t_expert, where s is the
    share of decoding steps on which any row defers, since the expert must run on each of them."""
    expert_calls: int = 0
    mean_catch_up: float | None = None
    checked: int = 0
    """Deferred positions the expert judged (drafting: drafted stand-ins and deferrals checked at once)."""
    drafts_cut: int = 0
    """Drafts cut at a stand-in the expert did not keep."""
    rewritten: int = 0
    """Base tokens the expert re-wrote (rewinds)."""
    extra: dict = field(default_factory=dict)


def pattern_router(fraction: float, steps: int, seed: int, rows: int = 1, per_row: bool = False):
    """A router that defers on exactly round(fraction * steps) evenly spaced steps of each row.

    ``per_row=False``: every row defers at the same steps. ``per_row=True``: each row has its own seeded
    phase, so in a batch the expert runs whenever any row defers (the realistic case for a real head).
    """
    generator = torch.Generator().manual_seed(seed)
    phases = torch.rand(rows if per_row else 1, generator=generator).tolist()
    marks = torch.tensor([[int((t + 1) * fraction + p) > int(t * fraction + p) for p in phases]
                          for t in range(steps)], dtype=torch.long)  # (steps, rows or 1)

    on_device = {}

    def route(step: int, log_pz: torch.Tensor) -> torch.Tensor:
        # moved once: a per-step copy from host memory would wait for the GPU, an extra sync per token
        if log_pz.device not in on_device:
            on_device[log_pz.device] = marks.to(log_pz.device)
        marks_here = on_device[log_pz.device]  # drafting re-runs steps after a cut: the pattern wraps around
        return marks_here[step % marks_here.shape[0]].expand(log_pz.shape[0])

    route.table = marks  # the same choices as a table, which the fused step reads on the device
    return route


def any_row_share(fraction: float, steps: int, seed: int, rows: int) -> float:
    """Share of the decoding steps (after the first token) on which at least one row of a per-row pattern
    defers: how often the expert must run."""
    table = pattern_router(fraction, steps, seed, rows, per_row=True).table
    return table[1:].any(-1).float().mean().item()


def build_models(config: BenchConfig):
    """(base, expert) from specs or random-weight shapes."""
    if config.base is not None:
        base, tokenizer = load_model(config.base, device=config.device, dtype=config.dtype)
        if is_remote_spec(config.expert):  # on its server: its own dtype and device
            return base, RemoteExpert(config.expert, tokenizer)
        expert, _ = load_model(config.expert, device=config.device, dtype=config.dtype)
        return base, expert
    from transformers import LlamaConfig, LlamaForCausalLM

    models = []
    for offset, name in enumerate(config.shapes.split("+")):
        torch.manual_seed(config.seed + offset)
        llama = LlamaConfig(**SHAPES[name], max_position_embeddings=4096)
        default = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[config.dtype])  # build in the target dtype: 8B in float32 is 32 GB
        try:
            with torch.device(config.device):
                models.append(LlamaForCausalLM(llama).eval())
        finally:
            torch.set_default_dtype(default)
    return models


def run(config: BenchConfig, progress=None) -> list[Row]:
    """Measure every (system, f, batch) asked for; returns rows with the ideal tau(f) filled in.

    Within a batch size, every system runs once per round, round after round (after one warm-up round),
    so the machine's slow spells fall on all of them alike; each row reports its median over the rounds.
    """
    base, expert = build_models(config)
    vocab = min(vocab_size(m) for m in (base, expert) if not getattr(m, "remote", False))
    head = DeferralHead(base.config.hidden_size).to(config.device)
    rows: list[Row] = []
    for batch in config.batches:
        prompts = torch.randint(0, vocab, (batch, config.prompt_len),
                                generator=torch.Generator().manual_seed(config.seed)).tolist()
        cases = _cases(config, _Runner(config, base, expert, head, prompts, vocab))
        timings = _round_robin(config, cases)
        batch_rows = [_row(key, batch, ms, out, config.new_tokens) for key, (ms, out) in timings.items()]
        alone = {r.system: r.ms_per_token for r in batch_rows if r.system in ("base", "expert")}
        for row in batch_rows:
            if row.system in ("base", "expert"):
                row.ideal_ms_per_token = row.ms_per_token
            elif row.system in ("collm", "naive") and len(alone) == 2:
                row.ideal_ms_per_token = alone["base"] + row.f * alone["expert"]
                if config.per_row and batch > 1:
                    share = any_row_share(row.f, config.new_tokens, config.seed, batch)
                    row.ideal_any_row_ms_per_token = alone["base"] + share * alone["expert"]
            if progress:
                progress(row)
        rows += [r for r in batch_rows if r.system.split("+")[0] in config.systems or "+draft" in r.system]
    return rows


def _cases(config: BenchConfig, runner: "_Runner") -> dict[tuple[str, float], Callable[[int], object]]:
    """(system, f) -> a function that decodes once, writing the given number of tokens; base and expert
    alone always run (they give tau)."""
    cases = {("base", 0.0): lambda n: runner.decode("base", n), ("expert", 1.0): lambda n: runner.decode("expert", n)}
    for system in ("hf_base", "hf_expert", "hf_base_static", "hf_expert_static"):
        if system in config.systems:
            cases[(system, 1.0 if "expert" in system else 0.0)] = runner.hf(system)
    for f in config.fractions:
        for system in ("collm", "naive"):
            if system in config.systems:
                cases[(system, f)] = runner.collab(f, naive=system == "naive")
        for k in config.lookahead:
            if "collm" in config.systems:
                cases[(f"collm+draft{k}", f)] = runner.collab(f, naive=False, lookahead=k)
        if config.rewind and "collm" in config.systems:
            for k in (1, *config.lookahead):
                name = "collm+rewind" if k == 1 else f"collm+draft{k}+rewind"
                cases[(name, f)] = runner.collab(f, naive=False, lookahead=k, rewind=config.rewind)
    for k in config.lookahead:
        cases[(f"expert+draft{k}", 1.0)] = lambda n, k=k: runner.decode("expert", n, lookahead=k)
    return cases


def _round_robin(config: BenchConfig, cases: dict) -> dict[tuple[str, float], tuple[dict, object]]:
    """Per (system, f): median milliseconds for N tokens and for 1, and the N-token run's output."""
    n = config.new_tokens
    times = {(key, length): [] for key in cases for length in (n, 1)}
    outputs = {key: fn(n) for key, fn in cases.items()}  # warm-up round: allocator, kernels, graphs, compiles
    for key, fn in cases.items():
        fn(1)
    for _ in range(config.repeats):
        for key, fn in cases.items():
            for length in (n, 1):
                _sync(config.device)
                start = time.perf_counter()
                out = fn(length)
                _sync(config.device)
                times[key, length].append(time.perf_counter() - start)
                if length == n:
                    outputs[key] = out
    ms = {key: {length: 1000 * statistics.median(times[key, length]) for length in (n, 1)} for key in cases}
    return {key: (ms[key], outputs[key]) for key in cases}


def _row(key: tuple[str, float], batch: int, ms: dict, out, n: int) -> Row:
    """`ms`: median milliseconds for n tokens and for 1 token."""
    system, f = key
    full, first = ms[n], ms[1]
    stats = out.stats if isinstance(out, Decoded) else {}
    calls = stats.get("expert_calls", 0)
    catch_up = stats["expert_tokens"] / (calls * batch) if calls and system.startswith(("collm", "naive")) else None
    return Row(system, f, batch, (full - first) / (n - 1), prefill_ms=first, total_ms_per_token=full / n,
               expert_calls=calls, mean_catch_up=catch_up, checked=stats.get("checked", 0),
               drafts_cut=stats.get("drafts_cut", 0), rewritten=stats.get("rewritten", 0))


class _Runner:
    """Closures that decode once with a given system, on fixed prompts."""

    def __init__(self, config, base, expert, head, prompts, vocab):
        self.config, self.base, self.expert, self.head = config, base, expert, head
        self.prompts, self.vocab = prompts, vocab
        self.runners: dict = {}  # static runners and captured graphs, reused across the timed calls

    def decode(self, mode: str, new_tokens: int, router=None, naive: bool = False, lookahead: int = 1,
               rewind: float = 0.0) -> Decoded:
        return decode(self.base, [self.expert], self.head, self.prompts, max_new_tokens=new_tokens,
                      threshold=0.5, sampling=Sampling(), mode=mode, eos_ids=(), vocab=self.vocab, lookahead=lookahead,
                      rewind=rewind,
                      router=router, reencode_experts=naive, compile=self.config.compile,
                      fused=None if self.config.fused else False,
                      prepack=None if self.config.prepack else False, runners=self.runners)

    def collab(self, f: float, naive: bool, lookahead: int = 1, rewind: float = 0.0) -> Callable[[int], Decoded]:
        router = pattern_router(f, self.config.new_tokens, self.config.seed, len(self.prompts), self.config.per_row)
        return lambda n: self.decode("collm", n, router, naive, lookahead, rewind)

    def hf(self, system: str) -> Callable[[int], object]:
        model = self.expert if "expert" in system else self.base
        ids = torch.tensor(self.prompts, device=self.config.device)
        kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
        if system.endswith("static"):
            kwargs["cache_implementation"] = "static"

        def run(n: int):
            with torch.inference_mode():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

        return run


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def markdown(rows: list[Row]) -> str:
    any_row = any(r.ideal_any_row_ms_per_token for r in rows)
    extra = " any-row τ | ratio to it |" if any_row else ""
    lines = ["| system | f | batch | ms/token | ideal τ(f) | ratio | tokens/s | expert calls | mean catch-up | "
             "checked | drafts cut | re-written | prefill ms | total ms/token |" + extra,
             "|" + " --- |" * 14 + " --- | --- |" * any_row]
    for r in rows:
        ideal = f"{r.ideal_ms_per_token:.2f}" if r.ideal_ms_per_token else "–"
        ratio = f"{r.ms_per_token / r.ideal_ms_per_token:.2f}" if r.ideal_ms_per_token else "–"
        catch = f"{r.mean_catch_up:.1f}" if r.mean_catch_up else "–"
        line = (f"| {r.system} | {r.f:g} | {r.batch} | {r.ms_per_token:.2f} | {ideal} | {ratio} | "
                f"{1000 * r.batch / r.ms_per_token:.0f} | {r.expert_calls} | {catch} | {r.checked} | "
                f"{r.drafts_cut} | {r.rewritten} | {r.prefill_ms:.1f} | {r.total_ms_per_token:.2f} |")
        if any_row:
            fair = r.ideal_any_row_ms_per_token
            line += f" {fair:.2f} | {r.ms_per_token / fair:.2f} |" if fair else " – | – |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def save(rows: list[Row], config: BenchConfig, json_path=None, md_path=None, png_path=None) -> None:
    """Write the rows as JSON (with the config that made them), a Markdown table and a PNG of ms/token vs f."""
    if json_path:
        write_json(json_path, {"config": asdict(config), "rows": [asdict(r) for r in rows]})
    if md_path:
        table = markdown(rows)
        write_text(Path(md_path), table)
    if png_path:
        _plot(rows, Path(png_path))


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(r.batch for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, style in (("collm", "o-"), ("naive", "s--")):
        pts = sorted((r.f, r.ms_per_token) for r in rows if r.system == system and r.batch == batch)
        if pts:
            ax.plot(*zip(*pts), style, label=system)
    ideal = sorted({(r.f, r.ideal_ms_per_token) for r in rows if r.system == "collm" and r.batch == batch
                    and r.ideal_ms_per_token})
    if ideal:
        ax.plot(*zip(*ideal), ":", color="gray", label="ideal τ(f)")
    for system, color in (("base", "tab:green"), ("expert", "tab:red")):
        for r in rows:
            if r.system == system and r.batch == batch:
                ax.axhline(r.ms_per_token, color=color, lw=0.8, label=f"{system} alone")
    ax.set_xlabel("deferral fraction f")
    ax.set_ylabel("ms / token")
    ax.set_title(f"batch {batch}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
