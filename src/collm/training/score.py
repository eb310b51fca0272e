"""Score the data with an expert, once: per completion token, log P_expert(gold) and whether its argmax is gold.

Training then never runs the expert (its gold log-probs are fixed targets in the loss), like TRL's
precomputed reference log-probs. The output folder is a *static dataset*:

    manifest.json            key (data fingerprint, expert identity, tokenizer identity), shard list
    shard-00000.safetensors  row_index (n,) int64, offsets (n+1,) int64 into the flat per-target arrays,
                             gold_logp (T,) float32, argmax_gold (T,) bool

Rows are scored longest first (little padding; an out-of-memory batch fails at once) in shards of
``shard_rows`` rows. Each shard and then the manifest are written atomically, so a run killed at any point
resumes at the first unfinished shard and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from collm.atomic import atomic_write, write_json
from collm.data.rows import DataConfig, EncodedData, Example, encode_file, length_order, pad_id
from collm.errors import CollmError
from collm.training.loss import argmax_is_gold, gold_log_probs
from collm.backends.models import DTYPES, check_vocab, load_model, load_tokenizer, weight_files

MANIFEST = "manifest.json"
SCORES_FORMAT = 1


@dataclass
class ScoreConfig:
    """One scoring run: which expert, which data, where the static dataset goes."""

    expert: str
    """Expert model spec: a local HF folder, a .gguf file or the embedded default's name."""
    data: str
    """JSONL file of {"prompt","completion"} or {"messages"} rows."""
    out: str
    """Output folder (created; resumed if it holds an unfinished run with the same key)."""
    tokenizer: str | None = None
    """Model spec whose tokenizer encodes the data; give the base's when its tokenizer differs from the
    expert's (e.g. another chat template), since training re-encodes with the base's and checks the key."""
    max_len: int = 1024
    """Tokens per row; longer rows are cut (counted and reported)."""
    chat: bool = True
    """Render prompt/completion rows with the chat template, as CoLLM.generate renders prompts."""
    add_eos: bool = True
    """End raw (non-chat) completions with EOS."""
    batch_tokens: int = 8192
    """Padded tokens per forward pass (rows x longest row); bounds memory."""
    shard_rows: int = 512
    """Rows per shard: the unit of resumption."""
    dtype: str = "float32"
    """Expert weights dtype (float32, bfloat16, ...); part of the expert's identity in the key."""
    device: str = "cpu"
    """Torch device for the expert."""
    overwrite: bool = False
    """Replace a folder holding scores for another key instead of refusing."""

    def __post_init__(self):
        if self.batch_tokens < 2 or self.shard_rows < 1:
            raise CollmError(f"batch_tokens must be >= 2 and shard_rows >= 1, got {self.batch_tokens}, {self.shard_rows}")
        if self.dtype not in DTYPES:
            raise CollmError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    def data_config(self) -> DataConfig:
        return DataConfig(max_len=self.max_len, chat=self.chat, add_eos=self.add_eos)


@dataclass
class Scores:
    """A static dataset loaded for training, aligned to ``EncodedData.examples``.

    Example i's targets are ``gold_logp[offsets[i]:offsets[i+1]]``, in position order.
    """

    expert: str
    gold_logp: torch.Tensor  # (T,) float32
    argmax_gold: torch.Tensor  # (T,) bool
    offsets: torch.Tensor  # (n+1,) int64


# ---------------------------------------------------------------- identities


def expert_identity(spec: str, dtype: str) -> str:
    """sha256 naming the expert's weights without reading them all: config, file names and sizes, and the
    first and last MiB of each weight file (a changed checkpoint changes these), plus the dtype."""
    h = hashlib.sha256(dtype.encode())
    for path in weight_files(spec):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            h.update(f.read(1 << 20))
    return h.hexdigest()


# ---------------------------------------------------------------- forward


def target_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gold log-probs (N,), argmax-is-gold (N,), hidden states h (N, H)) at the N targets, row-major.

    ``targets`` (B, L) bool marks target tokens; token t is predicted from h at t-1. The LM head runs on
    target positions only and in chunks, so a (B, L, vocab) tensor never exists. Models that post-process
    logits (soft-capping, scaling) take the plain full forward instead.
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    pred = targets[:, 1:]
    gold = input_ids[:, 1:][pred]
    if _post_processes_logits(hf.config):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logits = out.logits[:, :-1][pred]
        return gold_log_probs(logits, gold), argmax_is_gold(logits, gold), out.hidden_states[-1][:, :-1][pred]
    hidden = hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1][pred]
    lm_head = hf.get_output_embeddings()
    logp, hit = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start : start + chunk])
        logp.append(gold_log_probs(logits, gold[start : start + chunk]))
        hit.append(argmax_is_gold(logits, gold[start : start + chunk]))
    if not logp:
        return hidden.new_zeros(0), torch.zeros(0, dtype=torch.bool), hidden
    return torch.cat(logp), torch.cat(hit), hidden


def _post_processes_logits(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "final_logit_softcapping", None)) or getattr(text, "logit_scale", None) not in (None, 1)


def pad_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to (B, L): ids, attention mask, target mask. Right padding leaves a causal model's
    outputs at real positions unchanged."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        targets[row, :n] = torch.tensor(e.completion_mask)
    return ids, attention, targets


def token_batches(order: list[int], examples: list[Example], batch_tokens: int) -> list[list[int]]:
    """Split ``order`` (longest first) into batches of at most ``batch_tokens`` padded tokens."""
    batches, current = [], []
    for i in order:
        longest = len(examples[current[0]].input_ids) if current else len(examples[i].input_ids)
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


# ---------------------------------------------------------------- the run


def score(config: ScoreConfig, model=None, tokenizer=None, forward=target_outputs) -> Path:
    """Score ``config.data`` with the expert into ``config.out``; returns the folder.

    ``model``/``tokenizer`` may be passed already loaded (tests, notebooks); the key then uses
    ``config.expert`` as the identity. ``forward(model, ids, attention, targets)`` gives (gold log-probs,
    argmax-is-gold, hidden) at targets, as :func:`target_outputs` does; replace it to score with something
    that is not a transformers model (an oracle, a remote API). Raises CollmError for bad data, a vocabulary
    mismatch, or a folder holding scores for another key (unless ``overwrite``).
    """
    if model is None:
        model, tokenizer = load_model(config.expert, device=config.device, dtype=config.dtype)
        expert_id = expert_identity(config.expert, config.dtype)
    else:
        expert_id = hashlib.sha256(f"{config.expert}:{config.dtype}".encode()).hexdigest()
    data_tokenizer = tokenizer
    if config.tokenizer:
        data_tokenizer = load_tokenizer(config.tokenizer)
        check_vocab(data_tokenizer, tokenizer, ("data tokenizer", "expert"))
    data = encode_file(config.data, data_tokenizer, config.data_config())
    print(f"data: {data.stats.describe()}")
    out = Path(config.out)
    manifest = _start(out, config, data, expert_id)
    _run_shards(model, data, manifest, out, config, pad_id(data_tokenizer), forward)
    return out



def _start(out: Path, config: ScoreConfig, data: EncodedData, expert_id: str) -> dict:
    """A fresh manifest, or the existing one when it has the same key and shard layout."""
    key = {"data": data.fingerprint, "expert": expert_id, "tokenizer": data.tokenizer_id}
    fresh = {
        "format": SCORES_FORMAT, "key": key, "expert": config.expert, "data": str(config.data),
        "data_config": asdict(config.data_config()), "dtype": config.dtype, "shard_rows": config.shard_rows,
        "num_rows": len(data.examples), "num_targets": data.stats.targets,
        "num_shards": -(-len(data.examples) // config.shard_rows), "shards": {}, "complete": False,
    }
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        same = old.get("key") == key and old.get("shard_rows") == config.shard_rows
        if not same and not config.overwrite:
            what = "shard_rows" if old.get("key") == key else _key_difference(old.get("key", {}), key)
            raise CollmError(f"{out} holds scores with another {what}; use another --out or --overwrite")
        if same:
            _clean(out, keep=set(old["shards"].values()))
            return old
    _clean(out, keep=set())
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, fresh)
    return fresh


def _key_difference(old: dict, new: dict) -> str:
    names = {"data": "data fingerprint", "expert": "expert identity", "tokenizer": "tokenizer identity"}
    return ", ".join(names[k] for k in names if old.get(k) != new.get(k)) or "key"


def _clean(out: Path, keep: set[str]) -> None:
    """Remove shard files not listed (left by a kill mid-write, or by another key)."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.is_file() and p.name not in keep and (p.name.startswith(".") or p.name.startswith("shard-")):
            p.unlink()


def _run_shards(model, data: EncodedData, manifest: dict, out: Path, config: ScoreConfig, pad_id: int,
                forward) -> None:
    order = length_order(data.examples)
    rows = config.shard_rows
    done_tokens = sum(len(data.examples[i].input_ids) for k in map(int, manifest["shards"])
                      for i in order[k * rows : (k + 1) * rows])
    total = sum(len(e.input_ids) for e in data.examples)
    bar = tqdm(total=total, initial=done_tokens, unit="tok", unit_scale=True, desc=f"scoring {Path(config.data).name}")
    started = time.perf_counter()
    for k in range(manifest["num_shards"]):
        name = f"shard-{k:05d}.safetensors"
        if str(k) in manifest["shards"] and (out / name).is_file():
            continue
        tensors = _score_shard(model, data.examples, order[k * rows : (k + 1) * rows], config, pad_id, bar, forward)
        atomic_write(out / name, lambda tmp: save_file(tensors, tmp, metadata={"shard": str(k)}))
        manifest["shards"][str(k)] = name
        write_json(out / MANIFEST, manifest)
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    bar.close()
    seconds = time.perf_counter() - started
    print(f"scored {total - done_tokens} tokens in {seconds:.1f}s ({(total - done_tokens) / max(seconds, 1e-9):.0f} tok/s)"
          f" -> {out}")


@torch.inference_mode()
def _score_shard(model, examples: list[Example], rows: list[int], config: ScoreConfig, pad_id: int, bar,
                 forward) -> dict:
    logp, hit = {}, {}
    device = config.device
    for batch in token_batches(rows, examples, config.batch_tokens):
        ids, attention, targets = pad_batch([examples[i] for i in batch], pad_id)
        gold, right, _ = forward(model, ids.to(device), attention.to(device), targets.to(device))
        counts = [examples[i].num_targets for i in batch]
        for i, a, b in zip(batch, gold.float().cpu().split(counts), right.cpu().split(counts)):
            logp[i], hit[i] = a, b
        bar.update(int(attention.sum()))
    index = sorted(rows)  # file order inside a shard, so training can map rows without sorting
    counts = torch.tensor([0] + [examples[i].num_targets for i in index])
    return {
        "row_index": torch.tensor(index, dtype=torch.long),
        "offsets": torch.cumsum(counts, 0),
        "gold_logp": torch.cat([logp[i] for i in index]).contiguous(),
        "argmax_gold": torch.cat([hit[i] for i in index]).contiguous(),
    }


# ---------------------------------------------------------------- loading for training


def load_scores(folder: str | Path, data: EncodedData) -> Scores:
    """Load a finished static dataset and check it was made for ``data`` (same fingerprint and tokenizer).

    Raises CollmError when the folder is missing or unfinished, or its key does not match: scores made for
    other data, another tokenisation or another max_len would silently misalign tokens.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CollmError(f"{folder} holds no scores ({MANIFEST} missing): run collm score first")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise CollmError(f"scores in {folder} are unfinished: re-run the same collm score command to resume")
    key = manifest["key"]
    if key["tokenizer"] != data.tokenizer_id:
        raise CollmError(f"scores in {folder} were made with another tokenizer than the base's: "
                         f"re-run collm score with --tokenizer set to the base")
    if key["data"] != data.fingerprint:
        raise CollmError(f"scores in {folder} were made for other data or encoding settings "
                         f"(fingerprint {key['data'][:12]} != {data.fingerprint[:12]}): re-run collm score on this file")
    return _assemble(folder, manifest, data)


def _assemble(folder: Path, manifest: dict, data: EncodedData) -> Scores:
    n = len(data.examples)
    per_row_logp, per_row_hit = [None] * n, [None] * n
    for k in range(manifest["num_shards"]):
        shard = load_file(str(folder / manifest["shards"][str(k)]))
        offsets = shard["offsets"].tolist()
        for j, i in enumerate(shard["row_index"].tolist()):
            per_row_logp[i] = shard["gold_logp"][offsets[j] : offsets[j + 1]]
            per_row_hit[i] = shard["argmax_gold"][offsets[j] : offsets[j + 1]]
    if any(t is None for t in per_row_logp):
        raise CollmError(f"scores in {folder} miss rows: delete the folder and score again")
    counts = torch.tensor([0] + [e.num_targets for e in data.examples])
    return Scores(manifest["expert"], torch.cat(per_row_logp), torch.cat(per_row_hit), torch.cumsum(counts, 0))
