"""Learn to defer: train the deferral head (and the base: full, LoRA or frozen) by marginal likelihood.

``setup`` validates and builds everything, ``fit`` is the loop, ``finish`` writes the run folder that
``CoLLM.from_pretrained`` loads. The expert never runs here: its gold log-probs come from ``collm score``.
Runs under ``accelerate launch`` (DDP across processes); the data order, the per-step token count that
normalises the loss, and checkpoints are the same whatever the number of micro-batches or processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object, set_seed
from tqdm.auto import tqdm

from collm.atomic import append_line, atomic_folder, write_json, write_text
from collm.backends.models import context_length, load_model
from collm.core.head import DeferralHead, parse_features
from collm.core.seed import check_seed
from collm.data.rows import DataConfig, EncodedData, check_fits, encode_file, pad_id
from collm.errors import CollmError
from collm.run import HEAD_FILE, seal, write_run_config
from collm.training.checkpoint import (
    check_owned_folder,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_marker,
    rng_state,
    save_checkpoint,
)
from collm.training.loss import (
    class_weights,
    defer_prob,
    disagreement_labels,
    lm_nll,
    marginal_token_nll,
    masked_mean,
    weak_bce,
    weak_labels,
)
from collm.training.score import Scores, load_scores, pad_batch, target_outputs
from collm.training.weak import RowOutputs, base_pass, fit_weak_start

TRAIN_CONFIG = "train_config.json"  # written first: it marks a folder as a run collm train owns
OBJECTIVES = ("marginal", "sft", "weak")
WEAK_LABELS = ("paper", "disagree")
BASE_MODES = ("full", "lora", "frozen")
SCHEDULES = ("cosine", "linear", "constant")
# Fields that do not change the trajectory: a run may resume with them changed.
_RESUME_FREE = ("out", "save_every", "keep_checkpoints", "resume")


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved into the run (``train_config.json``, ``collm.json``)."""

    base: str
    """Base model spec: a local HF folder, a .gguf file or the embedded default's name."""
    data: str
    """JSONL training data (the file the scores were made from)."""
    out: str
    """Run folder: checkpoints, metrics.jsonl, and the final collm.json + head (+ adapter or weights)."""
    scores: list[str] = field(default_factory=list)
    """Static datasets from ``collm score``, one per expert, in expert order (not needed for sft)."""
    objective: str = "marginal"
    """marginal: Co-LLM's −log Σ_k π_k P_k(x); sft: plain fine-tuning of the base (baseline);
    weak: LM loss + class-weighted BCE of the head on pseudo-labels (baseline)."""
    base_mode: str = "lora"
    """full: train every base weight; lora: train LoRA adapters; frozen: train the head only, on cached
    base outputs (fast; the base runs once)."""
    weak_start: bool = True
    """Marginal objective, and the weak objective with a trained base (lora, full): first fit the head to
    pseudo-labels (``weak_label``) on the original base's hidden states, in-process, then train base and head
    together from there. (With a frozen base the weak objective is that same fit, so it has no weak start.)"""
    weak_label: str = "paper"
    """Pseudo-labels of the weak start and the weak objective: paper (expert's argmax is gold, base's is not)
    or disagree (exactly one of them has gold as argmax; for training text a model wrote itself, such as the
    base's own solutions, where the paper's rule never fires; one expert only)."""
    disagree_below: float | None = None
    """With weak_label disagree: where the base wrote its own argmax and the expert would write another token,
    label a deferral only where the expert gives the base's token a probability below this (in (0, 1]); None:
    every such disagreement, also on wording the expert finds likely too."""
    head_features: str = ""
    """Besides the base's hidden state, the head also reads these features of the base's next-token
    distribution (comma-separated: entropy, max_prob, margin; "" for none). Decoding then computes the base's
    logits at every step, also where the expert writes."""
    weak_steps: int = 300
    """Optimizer steps of the weak start (and nothing else: it is cheap, on cached hidden states)."""
    weak_lr: float = 1e-2
    """Learning rate of the weak start."""
    weak_max_tokens: int = 200_000
    """Target tokens (of randomly chosen rows) whose hidden states the weak start caches; bounds memory."""
    weak_weight: float = 1.0
    """Weak objective: weight of the BCE term next to the LM loss."""
    max_len: int = 1024
    """Tokens per row; must equal the scoring run's (it is part of the data fingerprint)."""
    chat: bool = True
    """Render prompt/completion rows with the chat template (as scoring did)."""
    add_eos: bool = True
    """End raw completions with EOS (as scoring did)."""
    batch_size: int = 8
    """Rows per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised by the step's completion tokens."""
    epochs: float = 1.0
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps; overrides epochs."""
    lr: float = 2e-4
    """Peak learning rate of the base's weights (LoRA or full)."""
    head_lr: float = 1e-3
    """Peak learning rate of the deferral head."""
    weight_decay: float = 0.0
    """AdamW weight decay on the base's weights (never on the head)."""
    warmup_steps: int = 0
    """Linear warmup steps before the decay."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    precision: str = "fp32"
    """fp32, or bf16 autocast (weights and optimizer stay fp32)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_targets: str = "all-linear"
    """Modules that get adapters: all-linear, or comma-separated names (q_proj,v_proj)."""
    threshold: float = 0.5
    """Deferral threshold written into the run (calibrate picks a better one)."""
    seed: int = 0
    """Seeds data order, LoRA init and the weak start."""
    save_every: int = 100
    """Checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    batch_tokens: int = 8192
    """Padded tokens per forward in the no-grad base passes (pseudo-labels, caches)."""
    resume: bool = True
    """Continue from the run folder's latest checkpoint when its config matches."""

    def __post_init__(self):
        self.scores = [self.scores] if isinstance(self.scores, str) else list(self.scores)
        _one_of("objective", self.objective, OBJECTIVES)
        _one_of("base_mode", self.base_mode, BASE_MODES)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("precision", self.precision, ("fp32", "bf16"))
        _one_of("weak_label", self.weak_label, WEAK_LABELS)
        if self.weak_label == "disagree" and len(self.scores) > 1:
            raise CollmError("weak_label disagree is defined for one expert; with several use weak_label paper")
        if self.disagree_below is not None:
            if self.weak_label != "disagree":
                raise CollmError("disagree_below applies to weak_label disagree: add --weak-label disagree or drop it")
            if isinstance(self.disagree_below, bool) or not 0 < self.disagree_below <= 1:
                raise CollmError(f"disagree_below must be a probability in (0, 1], got {self.disagree_below!r}")
        if self.objective != "sft" and not self.scores:
            raise CollmError(f"objective {self.objective!r} needs --scores from collm score (one per expert)")
        if self.objective == "sft" and self.base_mode == "frozen":
            raise CollmError("objective sft trains the base: use base_mode lora or full, not frozen")
        for name in ("batch_size", "grad_accum", "save_every", "keep_checkpoints", "lora_r", "batch_tokens"):
            if getattr(self, name) < 1:
                raise CollmError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1 or self.epochs <= 0:
            raise CollmError(f"max_steps must be >= 1 and epochs > 0, got {self.max_steps}, {self.epochs}")
        if min(self.lr, self.head_lr, self.weak_lr) <= 0 or self.weight_decay < 0 or self.clip < 0:
            raise CollmError("learning rates must be > 0, and weight_decay and clip >= 0")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.threshold <= 1 or not 0 <= self.lora_dropout < 1:
            raise CollmError("min_lr_ratio and threshold must be in [0, 1], lora_dropout in [0, 1)")
        if self.warmup_steps < 0 or self.weak_steps < 0 or self.weak_max_tokens < 1:
            raise CollmError("warmup_steps and weak_steps must be >= 0, weak_max_tokens >= 1")
        check_seed(self.seed)
        self.head_features = ",".join(parse_features(self.head_features))

    def data_config(self) -> DataConfig:
        return DataConfig(max_len=self.max_len, chat=self.chat, add_eos=self.add_eos)

    @property
    def trains_head(self) -> bool:
        return self.objective != "sft"


def _one_of(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise CollmError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


# ---------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything ``fit`` needs, built and checked by ``setup``."""

    config: TrainConfig
    acc: Accelerator
    base: torch.nn.Module
    tokenizer: object
    head: DeferralHead | None
    data: EncodedData
    scores: list[Scores]
    module: torch.nn.Module  # what the optimizer trains and DDP wraps (base + head, or the head alone)
    cache: dict[int, RowOutputs] | None = None  # frozen base: its outputs at every row's targets
    labels: dict[int, torch.Tensor] | None = None  # weak objective: pseudo-labels per row
    label_weights: torch.Tensor | None = None
    weak_fit: dict | None = None
    steps_per_epoch: int = 0
    total_steps: int = 0


class _Trainee(torch.nn.Module):
    """Base and head in one module, so DDP syncs both and the optimizer sees one parameter list."""

    def __init__(self, base, head):
        super().__init__()
        self.base, self.head = base, head

    def forward(self, ids, attention, targets):
        features = self.head.features if self.head is not None else ()
        logp, hit, hidden = target_outputs(self.base, ids, attention, targets, features=features)
        return logp, hit, (self.head(hidden) if self.head is not None else None)


def setup(config: TrainConfig, acc: Accelerator | None = None) -> Setup:
    """Load the base, data and scores; check they agree; build head, LoRA and caches."""
    acc = acc or Accelerator(mixed_precision="bf16" if config.precision == "bf16" else "no")
    _check_world(acc)
    set_seed(config.seed)
    base, tokenizer = load_model(config.base, device=acc.device)
    data = encode_file(config.data, tokenizer, config.data_config())
    acc.print(f"data: {data.stats.describe()}")
    check_fits(data, context_length(base), "base")
    scores = [load_scores(folder, data) for folder in config.scores] if config.objective != "sft" else []
    hidden = base.config.get_text_config().hidden_size
    head = DeferralHead(hidden, max(len(scores), 1), config.head_features).to(acc.device) \
        if config.trains_head else None
    s = Setup(config, acc, base, tokenizer, head, data, scores, module=head)
    _base_pass_and_weak_start(s)
    s.base = _prepare_base(base, config)
    s.module = head if config.base_mode == "frozen" else _Trainee(s.base, head)
    world = acc.num_processes
    s.steps_per_epoch = len(data.examples) // (config.batch_size * config.grad_accum * world)
    if s.steps_per_epoch == 0:
        raise CollmError(f"{len(data.examples)} rows cannot fill one step of batch_size x grad_accum x processes = "
                         f"{config.batch_size * config.grad_accum * world} rows: lower batch_size or grad_accum")
    s.total_steps = config.max_steps or max(1, round(config.epochs * s.steps_per_epoch))
    return s


def _check_world(acc: Accelerator) -> None:
    """Refuse processes that were launched together but do not see each other: each would train alone and
    all would write the same run folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise CollmError(f"{launched} processes were launched but accelerate formed a group of {acc.num_processes}; "
                         f"on CPU set ACCELERATE_USE_CPU=1 (accelerate launch --multi_gpu --num_processes N)")


def _prepare_base(base, config: TrainConfig):
    base.train()
    if config.base_mode == "frozen":
        base.requires_grad_(False)
        return base
    if config.base_mode == "full":
        base.requires_grad_(True)
        return base
    from peft import LoraConfig, get_peft_model

    targets = config.lora_targets if config.lora_targets == "all-linear" else config.lora_targets.split(",")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft reads a property transformers has deprecated: nothing to act on
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            return get_peft_model(base, lora)
    except ValueError as e:
        raise CollmError(f"LoRA cannot wrap this base: {str(e).splitlines()[0]}") from None


def row_scores(scores: list[Scores], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i's expert gold log-probs and argmax-is-gold bits, (n, M) each."""
    logp = [s.gold_logp[s.offsets[i] : s.offsets[i + 1]] for s in scores]
    hit = [s.argmax_gold[s.offsets[i] : s.offsets[i + 1]] for s in scores]
    return torch.stack(logp, -1), torch.stack(hit, -1)


def _base_pass_and_weak_start(s: Setup) -> None:
    """One no-grad pass of the original base over the rows that need it, shared across processes."""
    c, n = s.config, len(s.data.examples)
    frozen, weak_obj = c.base_mode == "frozen", c.objective == "weak"
    weak_start = c.weak_start and c.weak_steps > 0 and (c.objective == "marginal" or weak_obj and not frozen)
    if not (frozen or weak_obj or weak_start):
        return
    rows = list(range(n)) if frozen or weak_obj else _weak_rows(s.data, c)
    outputs = _shared_base_pass(s, rows, hidden=frozen or weak_start)
    labels = {}
    for i, o in outputs.items():
        expert_logp, expert_hit = row_scores(s.scores, i)
        labels[i] = (disagreement_labels(o.base_hit, expert_hit, expert_logp, c.disagree_below)
                     if c.weak_label == "disagree"
                     else weak_labels(o.base_hit, expert_hit, expert_logp))
    if frozen:
        s.cache = outputs
    if weak_obj:
        flat = torch.cat([labels[i] for i in range(n)])
        s.labels, s.label_weights = labels, class_weights(flat, torch.ones_like(flat, dtype=torch.bool),
                                                           len(s.scores) + 1)
        s.acc.print(f"pseudo-labels: positive rate {float((flat > 0).float().mean()):.4f}")
    if weak_start:
        _weak_start(s, outputs, labels, _weak_rows(s.data, c))  # `rows` when only the weak start needed the pass
        if not frozen:  # the trained base recomputes its states; keep only the labels
            for o in outputs.values():
                o.hidden = None


def _weak_rows(data: EncodedData, c: TrainConfig) -> list[int]:
    """Randomly chosen rows holding about weak_max_tokens targets: the weak start's sample."""
    order = torch.randperm(len(data.examples), generator=torch.Generator().manual_seed(c.seed)).tolist()
    rows, tokens = [], 0
    for i in order:
        if tokens >= c.weak_max_tokens:
            break
        rows.append(i)
        tokens += data.examples[i].num_targets
    return sorted(rows)


def _shared_base_pass(s: Setup, rows: list[int], hidden: bool) -> dict[int, RowOutputs]:
    """Each process runs its share of ``rows``; every process gets all results."""
    acc = s.acc
    mine = rows[acc.process_index :: acc.num_processes]
    local = base_pass(s.base, s.data.examples, mine, batch_tokens=s.config.batch_tokens, pad_id=pad_id(s.tokenizer),
                      device=acc.device, hidden=hidden, autocast=acc.autocast,
                      features=s.head.features if s.head is not None else ())
    merged = {}
    for part in gather_object([local]) if acc.num_processes > 1 else [local]:
        merged.update(part)
    return merged


def _weak_start(s: Setup, outputs: dict[int, RowOutputs], labels: dict[int, torch.Tensor], rows: list[int]) -> None:
    c = s.config
    hidden = torch.cat([outputs[i].hidden for i in rows])
    flat = torch.cat([labels[i] for i in rows])
    fit = fit_weak_start(s.head, hidden, flat, steps=c.weak_steps, lr=c.weak_lr, batch=4096, seed=c.seed)
    for p in s.head.parameters():  # identical on every rank already; make it exact whatever the hardware
        p.data.copy_(broadcast(p.data.contiguous(), from_process=0))
    s.weak_fit = asdict(fit)
    s.acc.print(f"weak start: {fit.tokens} tokens, positive rate {fit.positive_rate:.4f}, "
                f"BCE {fit.loss:.4f}, head defers on {fit.defer_rate:.4f}")



# ---------------------------------------------------------------- the loop


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Row order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def step_rows(s: Setup, step: int) -> list[list[int]]:
    """The micro-batches (lists of rows) of optimizer step ``step``, for every process: [micro][process]."""
    c, world = s.config, s.acc.num_processes
    size = c.batch_size * c.grad_accum * world
    epoch, within = divmod(step, s.steps_per_epoch)
    rows = epoch_order(len(s.data.examples), c.seed, epoch)[within * size : (within + 1) * size]
    return [rows[k * c.batch_size : (k + 1) * c.batch_size] for k in range(c.grad_accum * world)]


def lr_factor(step: int, c: TrainConfig, total: int) -> float:
    """Warmup then decay to min_lr_ratio, as a multiplier of the peak learning rates."""
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
    if c.schedule == "cosine":
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if c.schedule == "linear":
        return 1 - (1 - c.min_lr_ratio) * progress
    return 1.0


def build_optimizer(s: Setup):
    """AdamW with the base's trainable weights and the head in separate groups (own lr; no decay on the head)."""
    c = s.config
    head_ids = {id(p) for p in s.head.parameters()} if s.head is not None else set()
    base_params = [p for p in s.module.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": base_params, "lr": c.lr, "weight_decay": c.weight_decay}] if base_params else []
    if s.head is not None:
        groups.append({"params": list(s.head.parameters()), "lr": c.head_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, c, s.total_steps))
    return optimizer, scheduler


def _batch_tensors(s: Setup, rows: list[int]):
    """Expert log-probs (N, M), pseudo-labels (N,) for these rows' targets, row-major like target_outputs."""
    device = s.acc.device
    if not s.scores:
        return None, None
    expert_logp = torch.cat([row_scores(s.scores, i)[0] for i in rows]).to(device)
    labels = torch.cat([s.labels[i] for i in rows]).to(device) if s.labels is not None else None
    return expert_logp, labels


def _forward(s: Setup, module, rows: list[int]):
    """(base gold log-probs (N,), head logits (N, ·) or None) for a micro-batch."""
    if s.cache is not None:
        hidden = torch.cat([s.cache[i].hidden for i in rows]).to(s.acc.device)
        base_logp = torch.cat([s.cache[i].base_logp for i in rows]).to(s.acc.device)
        return base_logp, module(hidden)
    ids, attention, targets = pad_batch([s.data.examples[i] for i in rows], pad_id(s.tokenizer))
    device = s.acc.device
    base_logp, _, logits = module(ids.to(device), attention.to(device), targets.to(device))
    return base_logp, logits


def micro_loss(s: Setup, module, rows: list[int], window_tokens: int):
    """The objective's loss for one micro-batch, normalised by the step's tokens (all processes), and
    sums for the log: (objective nll, π, deferrals at 0.5, tokens, the head's class-weighted BCE: weak only)."""
    with s.acc.autocast():
        base_logp, logits = _forward(s, module, rows)
    expert_logp, labels = _batch_tensors(s, rows)
    ones = torch.ones_like(base_logp, dtype=torch.bool)
    c = s.config
    bce = torch.zeros((), device=base_logp.device)
    if c.objective == "marginal":
        token_nll = marginal_token_nll(logits, base_logp, expert_logp)
        loss = masked_mean(token_nll, ones, window_tokens)
    else:
        token_nll = -base_logp.float()
        loss = lm_nll(base_logp, ones, window_tokens) if s.cache is None else token_nll.new_zeros(())
        if c.objective == "weak":
            bce = weak_bce(logits, labels, ones, s.label_weights, window_tokens)
            loss = loss + c.weak_weight * bce
    # DDP averages gradients over processes; the token count already spans them, so undo the average.
    loss = loss * s.acc.num_processes
    pi = defer_prob(logits.detach()) if logits is not None else torch.zeros_like(token_nll)
    sums = torch.stack([token_nll.detach().sum(), pi.sum(), (pi > 0.5).float().sum(),
                        torch.tensor(float(pi.numel()), device=pi.device), bce.detach().float()])
    return loss, sums


def train_step(s: Setup, module, optimizer, scheduler, step: int) -> dict:
    """One optimizer step over this process's micro-batches; returns the step's metrics (all processes)."""
    micro = step_rows(s, step)
    window_tokens = sum(s.data.examples[i].num_targets for rows in micro for i in rows)
    rank, world = s.acc.process_index, s.acc.num_processes
    mine = micro[rank::world]
    totals = torch.zeros(5, device=s.acc.device)
    for k, rows in enumerate(mine):
        # Gradients are reduced across processes once, on the last micro-batch.
        sync = contextlib.nullcontext() if k == len(mine) - 1 else s.acc.no_sync(module)
        with sync:
            loss, sums = micro_loss(s, module, rows, window_tokens)
            s.acc.backward(loss)
        totals += sums
    params = [p for p in module.parameters() if p.requires_grad]
    norm = s.acc.clip_grad_norm_(params, s.config.clip) if s.config.clip > 0 else torch.tensor(0.0)
    lr = optimizer.param_groups[-1]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals = s.acc.reduce(totals, reduction="sum") if world > 1 else totals
    nll, pi, deferred, tokens, bce = totals.tolist()  # the step's one host sync, for the log
    row = {"step": step + 1, "loss": nll / tokens, "mean_pi": pi / tokens, "defer_rate": deferred / tokens,
           "lr": lr, "grad_norm": float(norm), "tokens": int(tokens)}
    if s.config.objective == "weak":  # `loss` is the base's LM loss there, which a frozen base never changes
        row["head_bce"] = bce  # each micro-batch's BCE is already over the step's tokens: their sum is the mean
    return row


def fit(s: Setup) -> None:
    """Train from the latest checkpoint (or the start) to ``total_steps``, checkpointing as configured."""
    c, acc = s.config, s.acc
    out = Path(c.out)
    module = s.module
    optimizer, scheduler = build_optimizer(s)
    start = _resume(s, module, optimizer, scheduler)
    module, optimizer = acc.prepare(module, optimizer)
    optimizer.zero_grad(set_to_none=True)
    metrics = out / "metrics.jsonl"
    bar = tqdm(total=s.total_steps, initial=start, desc=f"train {c.objective}/{c.base_mode}",
               disable=not acc.is_main_process)
    for step in range(start, s.total_steps):
        # metrics.jsonl holds what the step computed, no wall-clock time: a resumed run writes the same bytes
        row = train_step(s, module, optimizer, scheduler, step)
        if acc.is_main_process:
            append_line(metrics, json.dumps(row))
            shown = {"bce": f"{row['head_bce']:.4f}"} if "head_bce" in row else {}
            bar.set_postfix(loss=f"{row['loss']:.4f}", **shown, pi=f"{row['mean_pi']:.3f}",
                            defer=f"{row['defer_rate']:.3f}")
            bar.update(1)
        if (step + 1) % c.save_every == 0 or step + 1 == s.total_steps:
            _checkpoint(s, module, optimizer, scheduler, step + 1)
    bar.close()
    s.module = acc.unwrap_model(module)


def _checkpoint(s: Setup, module, optimizer, scheduler, step: int) -> None:
    states = gather_object([rng_state()]) if s.acc.num_processes > 1 else [rng_state()]
    if s.acc.is_main_process:
        save_checkpoint(Path(s.config.out) / "checkpoints", step, s.acc.unwrap_model(module), optimizer, scheduler,
                        {"weak_fit": s.weak_fit}, states, keep=s.config.keep_checkpoints)
    s.acc.wait_for_everyone()


def _resume(s: Setup, module, optimizer, scheduler) -> int:
    """Restore the latest checkpoint when resuming; returns the step to start from. Also (re)writes the
    run's train_config.json and trims metrics.jsonl to the restored step.

    Everything that can fail (reading the old config, the log, the checkpoint) comes before anything is
    removed, so a refused or failed start leaves the folder as it was.
    """
    c, out = s.config, Path(s.config.out)
    saved = out / TRAIN_CONFIG
    old = _read_train_config(saved)
    path = latest_checkpoint(out / "checkpoints") if c.resume and old is not None else None
    if path is not None:
        _check_same_run(old, asdict(c), saved)
    metrics = _read_metrics(out / "metrics.jsonl")
    step = 0
    if path is not None:
        state = load_checkpoint(path, module, optimizer, scheduler, s.acc.process_index)
        s.weak_fit = state.get("weak_fit")
        step = state["step"]
        s.acc.print(f"resuming {out} at step {step} of {s.total_steps}")
    s.acc.wait_for_everyone()
    if s.acc.is_main_process:
        if path is None:
            clear_checkpoints(out / "checkpoints")
        write_json(saved, asdict(c))
        kept = "".join(line + "\n" for row_step, line in metrics if row_step <= step)
        write_text(out / "metrics.jsonl", kept)
    s.acc.wait_for_everyone()
    return step


def _check_same_run(old: dict, new: dict, where: Path) -> None:
    defaults = {f.name: f.default for f in fields(TrainConfig)}  # a field added later: its default was the rule
    changed = [k for k in new if k not in _RESUME_FREE and old.get(k, defaults.get(k)) != new[k]]
    if changed:
        raise CollmError(f"{where.parent} was trained with other settings ({', '.join(changed)}): "
                         f"use another --out, or --no-resume to start over")


_MARKER_KEYS = {"base", "objective", "base_mode"}


def check_out(out: Path) -> None:
    """Train writes only into a new or empty folder, or a run folder it made itself (its train_config.json)."""
    check_owned_folder(out, TRAIN_CONFIG, _MARKER_KEYS, "collm train")


def _read_train_config(path: Path) -> dict | None:
    return read_marker(path, _MARKER_KEYS, "collm train")


def _read_metrics(path: Path) -> list[tuple[int, str]]:
    """(step, line) of each row of the log. A last line that does not parse was cut short by a kill or a
    full disk and is dropped (its step is redone); a damaged line elsewhere is a CollmError naming it."""
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        step = _metrics_step(line)
        if step is None and number == len(lines):
            break  # the torn tail
        if step is None:
            raise CollmError(f"{path}:{number} is not a metrics row: delete that line (or the file) and run again")
        rows.append((step, line))
    return rows


def _metrics_step(line: str) -> int | None:
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


# ---------------------------------------------------------------- the run folder


def finish(s: Setup) -> Path:
    """Write the loadable run: head, adapter or weights, then collm.json last (it marks the run whole)."""
    c, out = s.config, Path(s.config.out)
    if not s.acc.is_main_process:
        s.acc.wait_for_everyone()
        return out
    trainee = s.module
    base = trainee.base if isinstance(trainee, _Trainee) else s.base
    hidden = base.config.get_text_config().hidden_size
    head = s.head if s.head is not None else DeferralHead.constant(hidden, 0.0, max(len(s.scores), 1))
    head.save(out / HEAD_FILE)  # sft: a head that never defers, so the run decodes as the tuned base alone
    weights = {"frozen": "original", "lora": "lora", "full": "full"}[c.base_mode]
    if weights == "lora":
        # embeddings are never adapted here; "auto" would look up the base's config.json on a model hub
        atomic_folder(out / "base_adapter", lambda tmp: base.save_pretrained(tmp, save_embedding_layers=False))
    elif weights == "full":
        atomic_folder(out / "base", lambda tmp: (base.save_pretrained(tmp), s.tokenizer.save_pretrained(tmp)))
    experts = [sc.expert for sc in s.scores]
    training = {**asdict(c), "weak_fit": s.weak_fit, "data_fingerprint": s.data.fingerprint,
                "steps": s.total_steps, "data_stats": asdict(s.data.stats)}
    write_run_config(out, {"base": _spec(c.base), "experts": [_spec(e) for e in experts],
                           "num_experts": head.num_experts, "hidden_size": head.hidden_size,
                           **({"head_features": list(head.features)} if head.features else {}),
                           "threshold": c.threshold, "dtype": "float32", "base_weights": weights,
                           "training": training})
    seal(out)  # last: the sha256 of every file a load reads
    s.acc.wait_for_everyone()
    return out


def _spec(spec: str) -> str:
    """A path spec made absolute, so the run loads from any working directory; names stay."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def train(config: TrainConfig) -> Path:
    """Set up, fit, and write the run folder; returns it. Safe to re-run: it resumes.

    Raises CollmError for an --out folder holding files collm train did not write (nothing there is
    touched), for a full disk (run the same command again once there is space: it resumes), and for
    settings that differ from the run being resumed.
    """
    out = Path(config.out)
    check_out(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        s = setup(config)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # bad input (a model path, the data): no empty run folder is left behind
        raise
    try:
        fit(s)
        return finish(s)
    finally:
        # the process group's threads must stop before the interpreter does: left running, one of two
        # `accelerate launch` processes sometimes aborted at exit ("terminate called without an active
        # exception", exit -6) after writing everything
        s.acc.end_training()
