"""Score the data with an expert, once: per completion token, log P_expert(gold) and whether its argmax is gold.

Training then never runs the expert (its gold log-probs are fixed targets in the loss), like TRL's
precomputed reference log-probs. The output folder is a *static dataset*:

    manifest.json            key (data fingerprint, expert identity, tokenizer identity), shard list
    shard-00000.safetensors  row_index (n,) int64, offsets (n+1,) int64 into the flat per-target arrays,
                             gold_logp (T,) float32, argmax_gold (T,) bool

Rows are scored longest first (little padding; an out-of-memory batch fails at once) in shards of
``shard_rows`` rows. Each shard and then the manifest are written atomically, so a run killed at any point
resumes at the first unfinished shard and ends with the same bytes as an uninterrupted run.

``reuse`` names finished score folders made by the same expert (weights and dtype) and tokenizer: a row whose
tokens and targets equal a row scored there is copied, not scored again (data that grows by appending rows
scores only the new ones). Copied values equal a fresh scoring's up to the batch's floating-point rounding.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from collm.atomic import remove, temp_siblings, write_json
from collm.backends.cross import same_vocab
from collm.backends.models import (
    DTYPES,
    check_vocab,
    context_length,
    load_model,
    load_tokenizer,
    plain_logits,
    weight_files,
)
from collm.backends.remote import RemoteExpert, is_remote_spec, vocab_mismatch
from collm.core.head import head_inputs
from collm.data.rows import (
    DataConfig,
    EncodedData,
    Example,
    check_fits,
    encode_file,
    length_order,
    pad_id,
    tokenizer_identity,
)
from collm.errors import CollmError
from collm.tensorfile import write_tensors
from collm.training.align import align_file, base_outputs
from collm.training.loss import ARGMAX_RTOL, gold_outputs

MANIFEST = "manifest.json"
# 2: a target counts as the expert's greedy choice when it ties the maximum (loss.argmax_is_gold); format 1
# needed the lowest-index argmax. Scores of another format are refused, never mixed.
SCORES_FORMAT = 2
KIND = "collm scores"


@dataclass
class ScoreConfig:
    """One scoring run: which expert, which data, where the static dataset goes."""

    expert: str
    """Expert model spec: a local HF folder, a .gguf file, the embedded default's name, or a vLLM server
    ``http://HOST:PORT/v1[#MODEL]`` (scored with its ``prompt_logprobs``; needs ``tokenizer``)."""
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
    reuse: list[str] = field(default_factory=list)
    """Finished score folders of the same expert, dtype and tokenizer: rows with the same tokens are copied
    from them instead of scored again (repeatable)."""

    def __post_init__(self):
        self.reuse = [self.reuse] if isinstance(self.reuse, str) else [str(p) for p in self.reuse]
        if self.batch_tokens < 2 or self.shard_rows < 1:
            raise CollmError("batch_tokens must be >= 2 and shard_rows >= 1, "
                             f"got {self.batch_tokens}, {self.shard_rows}")
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
                   chunk: int = 1024,
                   features: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gold log-probs (N,), argmax-is-gold (N,), hidden states h (N, H)) at the N targets, row-major.

    ``targets`` (B, L) bool marks target tokens; token t is predicted from h at t-1. The LM head runs on
    target positions only and in chunks, so a (B, L, vocab) tensor never exists. Models that post-process
    logits (soft-capping, scaling) take the plain full forward instead. With ``features`` (a head's, see
    collm.core.head) the third output is the head's input: h followed by those features of the model's
    next-token distribution, (N, H + F) float32.
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    pred = targets[:, 1:]
    gold = input_ids[:, 1:][pred]
    if not plain_logits(hf):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logits, hidden = out.logits[:, :-1][pred], out.hidden_states[-1][:, :-1][pred]
        return (*gold_outputs(logits, gold), head_inputs(hidden, logits, features))
    hidden = hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1][pred]
    lm_head = hf.get_output_embeddings()
    logp, hit, inputs = [], [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start : start + chunk])
        chunk_logp, chunk_hit = gold_outputs(logits, gold[start : start + chunk])
        logp.append(chunk_logp)
        hit.append(chunk_hit)
        if features:  # per chunk, like the logits they come from
            inputs.append(head_inputs(hidden[start : start + chunk], logits, features))
    if not logp:
        width = hidden.shape[-1] + len(features)
        return hidden.new_zeros(0), torch.zeros(0, dtype=torch.bool), hidden.new_zeros((0, width))
    return torch.cat(logp), torch.cat(hit), torch.cat(inputs) if features else hidden


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
    out = Path(config.out)
    if _read_own_manifest(out) is None:  # before minutes of loading: a folder holding others' files is refused
        _check_empty(out)
    if model is None and is_remote_spec(config.expert):
        model, tokenizer, forward = _remote_expert(config)
        expert_id = model.identity
    elif model is None:
        model, tokenizer = load_model(config.expert, device=config.device, dtype=config.dtype)
        expert_id = expert_identity(config.expert, config.dtype)
    else:
        expert_id = hashlib.sha256(f"{config.expert}:{config.dtype}".encode()).hexdigest()
    data_tokenizer, aligned = tokenizer, None
    if config.tokenizer:
        data_tokenizer = load_tokenizer(config.tokenizer)
    data = encode_file(config.data, data_tokenizer, config.data_config())
    print(f"data: {data.stats.describe()}")
    if data_tokenizer is not tokenizer and not same_vocab(data_tokenizer, tokenizer):
        if getattr(model, "remote", False):
            check_vocab(data_tokenizer, tokenizer, ("data tokenizer", "expert"))
        # another tokenizer: the expert scores its own tokens of each row, aligned to the base's by characters
        aligned = align_file(config.data, data_tokenizer, tokenizer, config.data_config())
        if len(aligned) != len(data.examples):
            raise CollmError(f"{config.data}: {len(aligned)} rows aligned for the expert but {len(data.examples)} "
                             "encoded for the base")
        expert_id = hashlib.sha256(f"{expert_id}:aligned by characters:{tokenizer_identity(tokenizer)}".encode()
                                   ).hexdigest()
        print(f"the expert's tokenizer differs from the data's: {sum(len(a.example.input_ids) for a in aligned)} "
              "expert tokens, scores aligned to the base's tokens by characters (collm.training.align)")
        long = max(len(a.example.input_ids) for a in aligned)
        if context_length(model) and long > context_length(model):
            raise CollmError(f"a row is {long} tokens for the expert, past its context of {context_length(model)}")
    else:
        check_fits(data, context_length(model), "expert")
    known = reused_rows(config.reuse, data, expert_id, data_tokenizer)  # checked before the folder is touched
    if config.reuse:
        print(f"reusing {len(known)} of {len(data.examples)} rows from {', '.join(map(str, config.reuse))}")
    manifest = _start(out, config, data, expert_id)
    _run_shards(model, data, manifest, out, config, pad_id(tokenizer if aligned else data_tokenizer), forward, known,
                aligned)
    return out


def reused_rows(folders, data: EncodedData, expert_id: str,
                tokenizer) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Row index in ``data`` -> (gold log-probs, argmax-is-gold) copied from finished score folders whose row has
    the same tokens and targets. Raises CollmError for a folder that is unfinished, was made by another expert,
    dtype or tokenizer, or whose data file changed (or moved) since it was scored."""
    wanted: dict[tuple, list[int]] = {}
    for i, example in enumerate(data.examples):
        wanted.setdefault(_row_key(example), []).append(i)
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for folder in map(Path, folders):
        manifest = _read_own_manifest(folder, "give a folder collm score wrote to --reuse")
        if manifest is None:
            raise CollmError(f"--reuse {folder} holds no scores ({MANIFEST} missing): give a folder collm score wrote")
        if manifest.get("format") != SCORES_FORMAT or not manifest.get("complete"):
            raise CollmError(f"--reuse {folder}: its scores are unfinished or of another format; finish them "
                             "(re-run their collm score command) or leave them out")
        key = manifest["key"]
        if key["expert"] != expert_id or key["tokenizer"] != data.tokenizer_id:
            what = "expert or dtype" if key["expert"] != expert_id else "tokenizer"
            raise CollmError(f"--reuse {folder} was scored with another {what}: only scores of the same expert, "
                             "dtype and tokenizer can be reused")
        source = Path(manifest["data"])
        if not source.is_file():
            raise CollmError(f"--reuse {folder}: its data file {source} is missing (run from the folder it was "
                             "scored from, or leave it out)")
        old = encode_file(source, tokenizer, DataConfig(**manifest["data_config"]))
        if old.fingerprint != key["data"]:
            raise CollmError(f"--reuse {folder}: its data file {source} changed since it was scored; leave it out")
        scores = _assemble(folder, manifest, old)
        for j, example in enumerate(old.examples):
            for i in wanted.get(_row_key(example), ()):
                span = slice(int(scores.offsets[j]), int(scores.offsets[j + 1]))
                found.setdefault(i, (scores.gold_logp[span], scores.argmax_gold[span]))
    return found


def _row_key(example: Example) -> tuple:
    return tuple(example.input_ids), tuple(example.completion_mask)


def _remote_expert(config: ScoreConfig):
    """An expert on a vLLM server: it scores with ``prompt_logprobs``; the data is encoded with ``--tokenizer``
    (the base's), which the server's vocabulary is checked against."""
    if not config.tokenizer:
        raise CollmError(f"scoring with the expert server {config.expert} needs --tokenizer (the base's model spec)")
    tokenizer = load_tokenizer(config.tokenizer)
    expert = RemoteExpert(config.expert, tokenizer, check=False)
    problem = vocab_mismatch(expert, tokenizer)
    if problem:
        raise CollmError(f"{problem}: scoring across tokenizers aligns the expert's tokens in process; give the "
                         "expert as a model folder or .gguf")
    return expert, tokenizer, _remote_outputs


def _remote_outputs(expert: RemoteExpert, *batch):
    """What local scoring stores, from the server's log-probs: gold's, and whether it ties the best (the same
    tie rule as collm.training.loss.gold_outputs)."""
    gold, best = expert.gold_and_best(*batch)
    return gold, torch.isclose(gold, best, rtol=ARGMAX_RTOL), None



def _start(out: Path, config: ScoreConfig, data: EncodedData, expert_id: str) -> dict:
    """A fresh manifest, or the existing one when it has the same key and shard layout.

    The folder must be new, empty, or hold a manifest collm score wrote: only the files that manifest
    lists (and their temporary siblings) are ever removed, so nothing a user put there is lost.
    """
    key = {"data": data.fingerprint, "expert": expert_id, "tokenizer": data.tokenizer_id}
    fresh = {
        "format": SCORES_FORMAT, "kind": KIND, "key": key, "expert": config.expert, "data": str(config.data),
        "data_config": asdict(config.data_config()), "dtype": config.dtype, "shard_rows": config.shard_rows,
        "num_rows": len(data.examples), "num_targets": data.stats.targets,
        "num_shards": -(-len(data.examples) // config.shard_rows), "shards": {}, "pending": None, "complete": False,
    }
    old = _read_own_manifest(out)
    if old is None:
        _check_empty(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / MANIFEST, fresh)
        return fresh
    if old.get("format") == SCORES_FORMAT and old["key"] == key and old.get("shard_rows") == config.shard_rows:
        _clean(out, old)
        return old
    if not config.overwrite:
        if old.get("format") != SCORES_FORMAT:
            what = f"an older format ({old.get('format')}, another argmax rule)"
        else:
            what = "another " + ("shard_rows" if old["key"] == key else _key_difference(old["key"], key))
        raise CollmError(f"{out} holds scores with {what}; use another --out or --overwrite")
    _remove_own(out, old)
    write_json(out / MANIFEST, fresh)
    return fresh


def _read_own_manifest(out: Path, fix: str = "give another --out (collm never writes over files it did "
                                                       "not write)") -> dict | None:
    """The scores manifest in ``out``, None where there is none; CollmError (ending in ``fix``) for a
    manifest.json that collm score did not write (it is never overwritten)."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    ours = isinstance(manifest, dict) and isinstance(manifest.get("key"), dict) and \
        isinstance(manifest.get("shards"), dict) and isinstance(manifest.get("num_shards"), int)
    if not ours:
        raise CollmError(f"{path} was not written by collm score: {fix}")
    return manifest


def _check_empty(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CollmError(f"--out {out} is a file: give a folder")
    if out.is_dir():
        found = sorted(p.name for p in out.iterdir())
        if found:
            raise CollmError(f"{out} holds files collm score did not write ({', '.join(found[:3])}"
                             f"{', ...' if len(found) > 3 else ''}): give a new or empty --out")


def _key_difference(old: dict, new: dict) -> str:
    names = {"data": "data fingerprint", "expert": "expert identity", "tokenizer": "tokenizer identity"}
    return ", ".join(names[k] for k in names if old.get(k) != new.get(k)) or "key"


def _own_names(manifest: dict) -> list[str]:
    """Files this manifest proves collm score wrote: its shards, the shard being written, itself."""
    pending = [manifest["pending"]] if isinstance(manifest.get("pending"), str) else []
    return [*manifest["shards"].values(), *pending, MANIFEST]


def _clean(out: Path, manifest: dict) -> None:
    """Before resuming: remove what a kill mid-write left (the pending shard, temporary files)."""
    for name in _own_names(manifest):
        for leftover in temp_siblings(out / name):
            remove(leftover)
    pending = manifest.get("pending")
    if isinstance(pending, str) and pending not in manifest["shards"].values() and (out / pending).is_file():
        (out / pending).unlink()


def _remove_own(out: Path, manifest: dict) -> None:
    """--overwrite: remove the shards the old manifest lists, and their temporary files; nothing else."""
    _clean(out, manifest)
    for name in manifest["shards"].values():
        if (out / name).is_file() and "/" not in name:
            (out / name).unlink()


def _run_shards(model, data: EncodedData, manifest: dict, out: Path, config: ScoreConfig, pad_id: int,
                forward, known: dict | None = None, aligned: list | None = None) -> None:
    order = length_order(data.examples)
    rows = config.shard_rows
    known = known or {}
    done = {i for k in map(int, manifest["shards"]) for i in order[k * rows : (k + 1) * rows]}
    done_tokens = sum(len(data.examples[i].input_ids) for i in done)
    copied = sum(len(data.examples[i].input_ids) for i in known if i not in done)  # not timed as scored
    total = sum(len(e.input_ids) for e in data.examples)
    bar = tqdm(total=total, initial=done_tokens, unit="tok", unit_scale=True, desc=f"scoring {Path(config.data).name}")
    started = time.perf_counter()
    for k in range(manifest["num_shards"]):
        name = f"shard-{k:05d}.safetensors"
        if str(k) in manifest["shards"] and (out / name).is_file():
            continue
        if (out / name).exists() and name not in manifest["shards"].values():
            raise CollmError(f"{out / name} was not written by this collm score run: move it away and run again")
        manifest["pending"] = name  # recorded first, so a kill leaves a file the manifest proves is ours
        write_json(out / MANIFEST, manifest)
        tensors = _score_shard(model, data.examples, order[k * rows : (k + 1) * rows], config, pad_id, bar, forward,
                               known, aligned)
        write_tensors(out / name, tensors, {"shard": str(k)})
        manifest["shards"][str(k)] = name
        manifest["pending"] = None
        write_json(out / MANIFEST, manifest)
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    bar.close()
    seconds = time.perf_counter() - started
    scored = total - done_tokens - copied
    print(f"scored {scored} tokens in {seconds:.1f}s ({scored / max(seconds, 1e-9):.0f} tok/s)"
          + (f", copied {copied} from --reuse" if copied else "") + f" -> {out}")


@torch.inference_mode()
def _score_shard(model, examples: list[Example], rows: list[int], config: ScoreConfig, pad_id: int, bar,
                 forward, known: dict, aligned: list | None = None) -> dict:
    logp, hit = {}, {}
    for i in rows:
        if i in known:
            logp[i], hit[i] = known[i]
            bar.update(len(examples[i].input_ids))
    device = config.device
    scored = examples if aligned is None else [a.example for a in aligned]  # what the expert reads, per row
    for batch in token_batches([i for i in rows if i not in known], scored, config.batch_tokens):
        ids, attention, targets = pad_batch([scored[i] for i in batch], pad_id)
        gold, right, _ = forward(model, ids.to(device), attention.to(device), targets.to(device))
        counts = [scored[i].num_targets for i in batch]
        for i, a, b in zip(batch, gold.float().cpu().split(counts), right.cpu().split(counts)):
            logp[i], hit[i] = (a, b) if aligned is None else base_outputs(aligned[i], a, b)
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
    manifest = _read_own_manifest(folder, "give the folder collm score wrote")
    if manifest.get("format") != SCORES_FORMAT:
        raise CollmError(f"scores in {folder} have format {manifest.get('format')} (another argmax rule); this collm "
                         f"reads {SCORES_FORMAT}: run collm score again with --overwrite")
    if not manifest.get("complete"):
        raise CollmError(f"scores in {folder} are unfinished: re-run the same collm score command to resume")
    key = manifest["key"]
    if key["tokenizer"] != data.tokenizer_id:
        raise CollmError(f"scores in {folder} were made with another tokenizer than the base's: "
                         f"re-run collm score with --tokenizer set to the base")
    if key["data"] != data.fingerprint:
        raise CollmError(f"scores in {folder} were made for other data or encoding settings "
                         f"(fingerprint {key['data'][:12]} != {data.fingerprint[:12]}): "
                         "re-run collm score on this file")
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
