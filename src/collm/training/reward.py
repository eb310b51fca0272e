"""Train the deferral head on whole answers: on-policy rollouts scored by a reward, policy gradient on the head.

Token labels say where the expert would write another token, not where its token decides the answer. Here the
head learns from outcomes (after RelayLLM, CITER and R2R): each round decodes training problems with the current
head, *sampling* each position's writer from the head's P(Z_t) (tokens stay greedy from whoever writes, so only
the routing is stochastic), scores each finished answer with

    reward = checker(row, answer) - price * (expert-written tokens)

and updates the head by a clipped policy gradient with a group baseline (GRPO): every problem is answered
``rollouts`` times, and an answer's advantage is its reward minus its group's mean (divided by the group's
standard deviation with ``normalize``). The base and the experts stay frozen: the head's inputs at every position
are kept from the rollouts, so the update never runs a model again.

Resumable at two grains: each decoded batch of a round is written as a shard (its head inputs, writers and
rewards) and a restarted round decodes only the batches it lacks; each finished round writes a checkpoint (head,
optimizer) and then removes its own shards. The output folder is a run (``collm.json``, ``head.safetensors``,
``manifest.json``) after every round, so ``collm calibrate`` / ``collm eval`` read it while training goes on.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from collm.atomic import TEMP_SUFFIX, atomic_folder, remove, write_json, write_text
from collm.core.head import DeferralHead
from collm.core.routing import defer_prob
from collm.core.seed import check_seed
from collm.errors import CollmError
from collm.run import HEAD_FILE, RUN_CONFIG, read_json, read_run_config, seal, spec_in, write_run_config
from collm.tensorfile import write_tensors
from collm.training.checkpoint import (
    check_owned_folder,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_marker,
    save_checkpoint,
)

REWARD_CONFIG = "reward_config.json"  # written first: it marks a folder as a run collm reward owns
METRICS = "metrics.jsonl"
ROLLOUTS = "rollouts"  # shards of the round in progress: rollouts/round-NNNN/batch-NNNN.{safetensors,json}
CHECKPOINTS = "checkpoints"
_ROUND = re.compile(r"round-\d{4}")
_SHARD = re.compile(r"batch-\d{4}\.(?:safetensors|json)")
_SHARD_TEMP = re.compile(rf"\.batch-\d{{4}}\.(?:safetensors|json)\.{TEMP_SUFFIX}")
# Fields that do not change the trajectory: a run may resume (or go on for more rounds) with them changed.
_RESUME_FREE = ("out", "rounds", "resume", "keep_checkpoints")

Checker = Callable[[dict, str], float]


@dataclass
class RewardConfig:
    """Everything that decides a reward run; saved into the run (``reward_config.json``, ``collm.json``)."""

    run: str
    """The run to start from (collm.json + head: base, experts and the head that routes the first rounds), e.g.
    a folder from collm train, or the shipped Qwen run (src/collm/assets/qwen). Its base and experts stay frozen."""
    data: str
    """JSONL training problems: one object per line with "prompt" (and what the checker reads, e.g. "answer")."""
    out: str
    """Run folder: checkpoints, metrics.jsonl, the round in progress, and the current collm.json + head."""
    checker: str = "gsm"
    """What an answer is worth: gsm (1 if its final number equals the row's "answer", else 0), or
    module:function, your own checker called as function(row, answer_text) -> float."""
    price: float = 0.0
    """Lambda: subtracted from the reward per token the expert writes (0.005: 200 expert tokens cost one right
    answer)."""
    rounds: int = 4
    """Rounds of rollouts and updates (a finished run goes on when run again with more)."""
    problems: int = 64
    """Training problems per round, taken in a seeded order that runs through the data before it repeats."""
    rollouts: int = 4
    """Answers per problem (the group whose mean reward is the baseline); at least 2."""
    batch_size: int = 32
    """Answers decoded together (each batch is one resumable shard)."""
    max_new_tokens: int = 256
    """Most new tokens per answer."""
    lr: float = 1e-4
    """Adam learning rate of the head (a hidden state's entries are large: each step moves a logit by about lr
    times their summed magnitude; watch the per-round KL in metrics.jsonl)."""
    updates: int = 4
    """Optimizer steps per round, each over all of the round's tokens."""
    clip_ratio: float = 0.2
    """PPO clipping of the probability ratio between the updated head and the head that decoded (0: none)."""
    normalize: bool = True
    """Divide each advantage by its group's reward standard deviation (GRPO); groups with equal rewards count 0."""
    chat: bool = True
    """Render prompts with the base's chat template."""
    stop: list[str] = field(default_factory=list)
    """Stop strings that end an answer."""
    device: str = "cpu"
    """Torch device of the models."""
    dtype: str | None = None
    """float32, bfloat16 or float16 for decoding; None: the starting run's."""
    seed: int = 0
    """Seeds the problem order and every answer's routing draws."""
    keep_checkpoints: int = 2
    """Round checkpoints kept on disk."""
    resume: bool = True
    """Continue from the folder's latest checkpoint (and the round in progress) when its config matches."""

    def __post_init__(self):
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        for name in ("rounds", "problems", "batch_size", "max_new_tokens", "updates", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CollmError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.rollouts, bool) or not isinstance(self.rollouts, int) or self.rollouts < 2:
            raise CollmError(f"rollouts must be an integer >= 2 (the group baseline needs two), got {self.rollouts!r}")
        for name, low in (("price", 0.0), ("lr", 0.0), ("clip_ratio", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (name == "lr" and value == 0):
                raise CollmError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        check_seed(self.seed)
        load_checker(self.checker)  # a bad checker is refused before any model loads


# ---------------------------------------------------------------- rewards


def gsm_checker(row: dict, answer: str) -> float:
    """1.0 where the answer's final number equals the row's "answer" (collm.data.answer), else 0.0."""
    from collm.data.answer import is_correct

    if "answer" not in row:
        raise CollmError('the gsm checker needs an "answer" in every row')
    return float(is_correct(answer, row["answer"]))


def load_checker(spec: str) -> Checker:
    """``gsm`` or ``module:function`` -> the checker; CollmError saying what to fix where it cannot be found."""
    if spec == "gsm":
        return gsm_checker
    module_name, _, name = str(spec).partition(":")
    if not module_name or not name:
        raise CollmError(f"checker {spec!r}: give gsm or module:function (a function(row, answer_text) -> float)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module, said in one line
        raise CollmError(f"checker {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    checker = getattr(module, name, None)
    if not callable(checker):
        raise CollmError(f"checker {spec!r}: {module_name} has no function {name!r}")
    return checker


def score_answer(checker: Checker, spec: str, row: dict, answer: str, index: int) -> float:
    """The checker's value for one answer, as a finite float; CollmError naming the row where it fails."""
    try:
        value = checker(row, answer)
    except CollmError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: report it in one line with the row
        raise CollmError(f"checker {spec!r} raised {type(e).__name__} on row {index}: {e}") from None
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CollmError(f"checker {spec!r} returned {value!r} for row {index}: it must return a finite number")
    return float(value)


# ---------------------------------------------------------------- rollouts


class _Recorder(torch.nn.Module):
    """Stands in for the head while a batch decodes: the same P(Z_t), and it keeps what the head read at every
    step. With :meth:`route` as the engine's router it draws each row's writer from P(Z_t) with the row's own
    generator, so an answer's draws do not depend on what else is in its batch."""

    def __init__(self, head: DeferralHead, generators: list[torch.Generator]):
        super().__init__()
        self.head, self.generators = head, generators
        self.hidden_size, self.num_experts = head.hidden_size, head.num_experts
        self.inputs_seen: list[torch.Tensor] = []
        self.choices: list[torch.Tensor] = []

    @property
    def needs_logits(self) -> bool:
        return self.head.needs_logits

    def inputs(self, hidden, logits=None):
        return self.head.inputs(hidden, logits)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs_seen.append(x.detach().to("cpu", copy=True))
        return self.head.log_probs(x)

    def route(self, step: int, log_pz: torch.Tensor) -> torch.Tensor:
        probs = log_pz.detach().float().exp().cpu()
        choice = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        self.choices.append(choice)
        return choice.to(log_pz.device)


def _answer_seed(seed: int, round_: int, problem: int, rollout: int) -> int:
    digest = hashlib.sha256(f"{seed}/{round_}/{problem}/{rollout}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rollout_batch(pair, rows: list[dict], seeds: list[int], config: RewardConfig) -> dict:
    """Decode ``rows`` once each with writers drawn from the head; returns per answer its text, tokens, reward
    parts, and the head inputs and writers of its positions (concatenated over the batch's answers)."""
    from collm.decoding.decode import decode

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    recorder = _Recorder(pair.head, generators)
    ids = pair.encode([row["prompt"] for row in rows], chat=config.chat)
    out = decode(pair.base, pair.experts, recorder, ids, max_new_tokens=config.max_new_tokens, threshold=0.5,
                 stop=tuple(config.stop), router=recorder.route, vocab=pair.vocab, eos_ids=pair._eos_ids(),
                 pad_id=pair._pad_id(), tokenizer=pair.tokenizer)
    steps = max(map(len, out.token_ids))  # each answer has at least one token
    inputs = torch.stack(recorder.inputs_seen[:steps])  # (steps, B, D): every row starts at step 0
    choices = torch.stack(recorder.choices[:steps])  # (steps, B)
    lengths = [len(t) for t in out.token_ids]
    for i, src in enumerate(out.sources):  # the engine wrote what the draws chose
        if src != choices[: lengths[i], i].tolist():
            raise RuntimeError(f"answer {i}: the writers differ from the head's draws")
    return {"texts": out.texts, "lengths": lengths,
            "inputs": torch.cat([inputs[:n, i] for i, n in enumerate(lengths)]),
            "choices": torch.cat([choices[:n, i] for i, n in enumerate(lengths)]),
            "expert_tokens": [sum(1 for s in src if s) for src in out.sources]}


# ---------------------------------------------------------------- the update


def advantages(rewards: torch.Tensor, groups: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Each answer's reward minus its group's mean reward (divided by the group's standard deviation where
    ``normalize``; a group whose rewards are all equal gives 0 to each of its answers)."""
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for g in groups.unique():
        members = groups == g
        r = rewards[members].double()
        centred = r - r.mean()
        if normalize:
            std = r.std(unbiased=False)
            centred = centred / std if std > 1e-8 else torch.zeros_like(centred)
        out[members] = centred
    return out.float()


def policy_loss(log_pz: torch.Tensor, old_log_pz: torch.Tensor, choices: torch.Tensor, advantage: torch.Tensor,
                clip_ratio: float) -> torch.Tensor:
    """Clipped policy-gradient loss (PPO/GRPO), averaged over tokens: log_pz, old_log_pz (N, M+1) the updated and
    the decoding head's log P(Z); choices (N,) the writers drawn; advantage (N,) each token's answer's advantage."""
    new = log_pz.gather(1, choices[:, None]).squeeze(1)
    old = old_log_pz.gather(1, choices[:, None]).squeeze(1)
    ratio = (new - old).exp()
    surrogate = ratio * advantage
    if clip_ratio > 0:
        surrogate = torch.minimum(surrogate, ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * advantage)
    return -surrogate.mean()


def update_head(head: DeferralHead, optimizer, batch: dict, config: RewardConfig) -> dict:
    """``config.updates`` Adam steps of :func:`policy_loss` over the round's tokens; returns the losses and how
    the mean P(defer) moved on those tokens."""
    x = batch["inputs"].float()
    choices = batch["choices"].long()
    token_adv = batch["advantages"].repeat_interleave(batch["lengths"])
    with torch.no_grad():
        old = head.log_probs(x)
    losses = []
    for _ in range(config.updates):
        optimizer.zero_grad(set_to_none=True)
        loss = policy_loss(head.log_probs(x), old, choices, token_adv, config.clip_ratio)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        new = head.log_probs(x)
        moved = (new.gather(1, choices[:, None]) - old.gather(1, choices[:, None])).squeeze(1)
        clipped = ((moved.exp() - 1).abs() > config.clip_ratio).float().mean() if config.clip_ratio > 0 else 0.0
        kl = (old.exp() * (old - new)).sum(-1).mean()  # KL(decoding head || updated head) per token
    return {"loss_first": losses[0], "loss_last": losses[-1], "defer_prob_before": float(defer_prob(old).mean()),
            "defer_prob_after": float(defer_prob(new).mean()), "kl": float(kl), "clipped": float(clipped)}


# ---------------------------------------------------------------- the run


def _problem_order(n_rows: int, seed: int, round_: int, per_round: int) -> list[int]:
    """Row indices of round ``round_``: one seeded permutation of the rows after another, ``per_round`` at a
    time, so every problem is used before any is used again."""
    perms: dict[int, list[int]] = {}
    order = []
    for i in range(round_ * per_round, (round_ + 1) * per_round):
        epoch, at = divmod(i, n_rows)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_rows, generator=torch.Generator().manual_seed(
                seed * 1_000_003 + epoch)).tolist()
        order.append(perms[epoch][at])
    return order


def _shard_paths(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"batch-{index:04d}.safetensors", folder / f"batch-{index:04d}.json"


def _round_batches(config: RewardConfig, problems: list[int]) -> list[list[tuple[int, int]]]:
    """(problem, rollout) pairs of the round, a group's answers side by side, cut into decode batches."""
    answers = [(p, k) for p in problems for k in range(config.rollouts)]
    return [answers[i : i + config.batch_size] for i in range(0, len(answers), config.batch_size)]


def _run_round(pair, rows: list[dict], checker: Checker, config: RewardConfig, round_: int, folder: Path,
               progress) -> dict:
    """Decode every batch of the round not already on disk (each written as one shard), then gather them."""
    problems = _problem_order(len(rows), config.seed, round_, config.problems)
    batches = _round_batches(config, problems)
    folder.mkdir(parents=True, exist_ok=True)
    for index, answers in enumerate(batches):
        tensors_path, meta_path = _shard_paths(folder, index)
        if meta_path.is_file() and tensors_path.is_file():
            continue
        started = time.perf_counter()
        batch_rows = [rows[p] for p, _ in answers]
        seeds = [_answer_seed(config.seed, round_, p, k) for p, k in answers]
        got = rollout_batch(pair, batch_rows, seeds, config)
        scores = [score_answer(checker, config.checker, rows[p], text, p)
                  for (p, _), text in zip(answers, got["texts"])]
        rewards = [s - config.price * e for s, e in zip(scores, got["expert_tokens"])]
        write_tensors(tensors_path, {"inputs": got["inputs"], "choices": got["choices"]})
        write_json(meta_path, {"answers": [list(a) for a in answers], "lengths": got["lengths"],
                               "scores": scores, "rewards": rewards, "expert_tokens": got["expert_tokens"],
                               "texts": got["texts"]})
        progress(f"round {round_ + 1} batch {index + 1}/{len(batches)}: mean reward "
                 f"{sum(rewards) / len(rewards):.3f}, {time.perf_counter() - started:.0f} s")
    return _gather(folder, len(batches))


def _gather(folder: Path, count: int) -> dict:
    metas, inputs, choices = [], [], []
    for index in range(count):
        tensors_path, meta_path = _shard_paths(folder, index)
        metas.append(read_json(meta_path))
        t = load_file(str(tensors_path))
        inputs.append(t["inputs"])
        choices.append(t["choices"])
    answers = [a for m in metas for a in m["answers"]]
    return {"problems": torch.tensor([a[0] for a in answers]),
            "lengths": torch.tensor([n for m in metas for n in m["lengths"]]),
            "scores": [s for m in metas for s in m["scores"]],
            "rewards": torch.tensor([r for m in metas for r in m["rewards"]], dtype=torch.float64),
            "expert_tokens": [e for m in metas for e in m["expert_tokens"]],
            "inputs": torch.cat(inputs), "choices": torch.cat(choices)}


_MARKER_KEYS = {"run", "checker", "price"}


def check_out(out: Path) -> None:
    """Refuse an --out folder holding files collm reward did not write (nothing there is touched)."""
    check_owned_folder(out, REWARD_CONFIG, _MARKER_KEYS, "collm reward")


def _read_saved_config(path: Path) -> dict | None:
    return read_marker(path, _MARKER_KEYS, "collm reward")


def _check_same_run(old: dict, new: dict, path: Path) -> None:
    changed = [k for k in sorted(set(old) | set(new)) if k not in _RESUME_FREE and old.get(k) != new.get(k)]
    if changed:
        k = changed[0]
        raise CollmError(f"{path}: this run was made with {k}={old.get(k)!r}, not {new.get(k)!r}; use the same "
                         f"settings to resume, or give a new --out (or --no-resume to start over there)")


def _read_rows(path: str) -> list[dict]:
    from collm.evaluation.evaluate import read_rows

    rows = read_rows(path)
    if not rows:
        raise CollmError(f"{path} holds no rows")
    return rows


def _write_run(out: Path, start_dir: Path, start_config: dict, head: DeferralHead, config: RewardConfig,
               rounds_done: int, history: list[dict]) -> None:
    """The folder as a loadable run: the starting run's models and threshold, the trained head, then the
    manifest. The base's own weights (an adapter) are copied from the starting run once."""
    head.save(out / HEAD_FILE)
    weights = start_config.get("base_weights", "original")
    folder = {"lora": "base_adapter", "full": "base"}.get(weights)
    if folder and not (out / folder).is_dir():
        atomic_folder(out / folder, lambda tmp: shutil.copytree(start_dir / folder, tmp, dirs_exist_ok=True))
    run_config = {k: v for k, v in start_config.items() if k not in ("format", "calibration")}
    run_config["base"] = str(Path(p).resolve()) if Path(p := spec_in(start_dir, start_config["base"])).exists() \
        else start_config["base"]
    run_config["experts"] = [str(Path(s).resolve()) if Path(s).exists() else s
                             for s in (spec_in(start_dir, e) for e in start_config["experts"])]
    run_config["training"] = {"objective": "reward", **asdict(config), "rounds_done": rounds_done,
                              "history": history, "started_from": start_config.get("training")}
    write_run_config(out, run_config)
    seal(out, [out / RUN_CONFIG, out / HEAD_FILE, *sorted(p for p in (out / folder).rglob("*") if p.is_file())]
         if folder else [out / RUN_CONFIG, out / HEAD_FILE])


def _summary(round_: int, gathered: dict, stats: dict) -> dict:
    """A round's line in metrics.jsonl: what it computed, no wall-clock time (a resumed run writes the same
    bytes); the time goes to the progress line."""
    tokens = int(gathered["lengths"].sum())
    expert = sum(gathered["expert_tokens"])
    n = len(gathered["scores"])
    return {"round": round_ + 1, "answers": n, "reward": float(gathered["rewards"].mean()),
            "accuracy": sum(gathered["scores"]) / n, "defer_rate": expert / tokens if tokens else 0.0,
            "tokens": tokens, **stats}


def train_reward(config: RewardConfig, progress: Callable[[str], None] = print) -> Path:
    """Run (or resume) the rounds and leave a loadable run in ``config.out``; returns it."""
    from collm.pair import CoLLM

    out = Path(config.out)
    check_out(out)
    saved_path = out / REWARD_CONFIG
    old = _read_saved_config(saved_path)
    if old is not None and config.resume:
        _check_same_run(old, asdict(config), saved_path)
    rows = _read_rows(config.data)
    checker = load_checker(config.checker)
    start_dir = Path(config.run)
    start_config = read_run_config(start_dir)
    if start_config.get("num_experts", 1) < 1 or not start_config["experts"]:
        raise CollmError(f"{start_dir} has no expert: collm reward trains who writes, which needs one")
    pair = CoLLM.from_pretrained(start_dir, device=config.device, dtype=config.dtype)
    out.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        _start_over(out)
    write_json(saved_path, asdict(config))  # once the start run and the data are known good
    head = pair.head.float()
    for p in head.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpoint = latest_checkpoint(out / CHECKPOINTS) if config.resume else None
    state = load_checkpoint(checkpoint, head, optimizer, scheduler, 0) if checkpoint else {"step": 0}
    done, history = state["step"], list(state.get("history", []))
    if checkpoint:
        progress(f"resuming {out} after round {done} of {config.rounds}")
    for round_ in range(done, config.rounds):
        started = time.perf_counter()
        folder = out / ROLLOUTS / f"round-{round_:04d}"
        with torch.no_grad():
            gathered = _run_round(pair, rows, checker, config, round_, folder, progress)
        gathered["advantages"] = advantages(gathered["rewards"], gathered["problems"], config.normalize)
        with torch.enable_grad():
            stats = update_head(head, optimizer, gathered, config)
        summary = _summary(round_, gathered, stats)
        history.append(summary)
        # the draws come from per-answer generators, not the global RNG: record a fixed state, not the process's
        save_checkpoint(out / CHECKPOINTS, round_ + 1, head, optimizer, scheduler, {"history": history},
                        [torch.Generator().manual_seed(config.seed).get_state()], keep=config.keep_checkpoints)
        _write_run(out, start_dir, start_config, head, config, round_ + 1, history)
        _write_metrics(out / METRICS, history)
        _remove_round(folder, out / ROLLOUTS)
        progress(f"round {round_ + 1}/{config.rounds}: reward {summary['reward']:.3f}, accuracy "
                 f"{summary['accuracy']:.3f}, deferral rate {summary['defer_rate']:.3f}, "
                 f"P(defer) {stats['defer_prob_before']:.3f} -> {stats['defer_prob_after']:.3f}, KL {stats['kl']:.4f}, "
                 f"{time.perf_counter() - started:.0f} s")
    if not (out / RUN_CONFIG).is_file():  # resumed a finished run, or rounds already done: still a run
        _write_run(out, start_dir, start_config, head, config, done, history)
    return out


def _write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl from the checkpoint's history, whole and atomically: it always agrees with the checkpoint."""
    text = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
    write_text(path, text)


def _start_over(out: Path) -> None:
    """--no-resume: remove what earlier runs of collm reward wrote here that would be resumed from (checkpoints,
    the round in progress, the log); the run files are rewritten after the first round."""
    clear_checkpoints(out / CHECKPOINTS)
    rollouts = out / ROLLOUTS
    if rollouts.is_dir():
        for folder in sorted(p for p in rollouts.iterdir() if _ROUND.fullmatch(p.name)):
            _remove_round(folder, rollouts)
    if (out / METRICS).is_file():
        remove(out / METRICS)


def _remove_round(folder: Path, parent: Path) -> None:
    """Remove a round's shards: only the files :func:`_run_round` writes (and the temporary files a kill while
    writing one leaves), then the folders if nothing else is in them."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if _SHARD.fullmatch(path.name) or _SHARD_TEMP.fullmatch(path.name):
            remove(path)
    for f in (folder, parent):
        if f.is_dir() and not any(f.iterdir()):
            f.rmdir()
