"""Task data → token ids with a completion mask (the loss and the scores cover completion tokens only).

Rows are JSONL, one object a line, either ``{"prompt": str, "completion": str}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}``. Messages are rendered with the base tokenizer's chat
template and the last message, which must be the assistant's, is the completion. Prompt/completion rows are
rendered as one user turn and one assistant turn when the tokenizer has a chat template (as
``CoLLM.generate`` renders a string prompt, so training sees what decoding will), else concatenated as they are.

Positions follow the causal-LM convention: token t is a *target* (predicted from positions < t, scored,
and trained on) iff ``completion_mask[t]``; position 0 is never a target.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from collm.errors import CollmError
from collm.hashing import update_with_file

log = logging.getLogger(__name__)

# Bump when the way rows become tokens changes: old score manifests must then stop matching.
ENCODING_VERSION = 1


@dataclass(frozen=True)
class DataConfig:
    """How rows become tokens; every field is part of the data fingerprint."""

    max_len: int = 1024
    """Tokens per row (prompt + completion); longer rows lose their tail, rows left with no completion
    token are dropped; both are counted and reported."""
    chat: bool = True
    """Render prompt/completion rows with the chat template (one user turn, one assistant turn) when the
    tokenizer has one, as ``CoLLM.generate`` does; False concatenates prompt and completion as they are."""
    add_eos: bool = True
    """End raw completions with the tokenizer's EOS so the model learns to stop (chat turns end themselves)."""

    def __post_init__(self):
        if self.max_len < 2:
            raise CollmError(f"max_len must be at least 2 (one prompt token and one target), got {self.max_len}")


@dataclass(frozen=True)
class Example:
    """One encoded row: ids and which of them are completion tokens (targets)."""

    input_ids: list[int]
    completion_mask: list[bool]

    @property
    def num_targets(self) -> int:
        return sum(self.completion_mask[1:])


@dataclass
class EncodeStats:
    """What encoding did to the rows; reported, so truncation is never silent."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    targets: int = 0

    def describe(self) -> str:
        return (
            f"{self.rows} rows, {self.tokens} tokens, {self.targets} completion tokens; "
            f"{self.truncated} truncated, {self.dropped} dropped (no completion token within max_len)"
        )


@dataclass
class EncodedData:
    """Encoded rows in file order (dropped rows removed), with the fingerprint that keys their scores."""

    examples: list[Example]
    fingerprint: str
    stats: EncodeStats
    tokenizer_id: str
    config: DataConfig = field(default_factory=DataConfig)


def read_rows(path: str | Path) -> list[dict]:
    """Parse a training JSONL file; raises CollmError naming the first bad line."""
    return read_jsonl(path, _check_row)


def read_jsonl(path: str | Path, check: Callable[[object, str], None]) -> list[dict]:
    """Parse a JSONL file, calling ``check(row, "file:line")`` on each row (it raises CollmError to refuse)."""
    path = Path(path)
    text = read_text(path, "data file")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CollmError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        check(row, f"{path}:{number}")
        rows.append(row)
    if not rows:
        raise CollmError(f"data file {path} has no rows")
    return rows


def _check_row(row: object, where: str) -> None:
    if not isinstance(row, dict):
        raise CollmError(f"{where}: a row must be a JSON object")
    if "messages" in row:
        messages = row["messages"]
        ok = isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise CollmError(f"{where}: 'messages' must be a list of at least 2 {{role, content}} string objects")
        if messages[-1]["role"] != "assistant":
            raise CollmError(f"{where}: the last message must be the assistant's (it is the completion)")
        return
    if not (isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)):
        raise CollmError(f"{where}: a row needs string 'prompt' and 'completion', or 'messages'")
    if not row["completion"]:
        raise CollmError(f"{where}: 'completion' is empty")


def tokenizer_identity(tokenizer) -> str:
    """sha256 of what decides tokenisation: the full fast-tokenizer spec (or the vocabulary), the chat
    template and the special tokens. Two tokenizers with equal identity give equal ids for equal text."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None)).encode())
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


def data_fingerprint(path: str | Path, tokenizer_id: str, config: DataConfig) -> str:
    """sha256 of the file's bytes, the tokenizer identity and the encoding config: the scores' key."""
    h = hashlib.sha256()
    update_with_file(h, path)
    h.update(tokenizer_id.encode())
    h.update(json.dumps({**asdict(config), "version": ENCODING_VERSION}, sort_keys=True).encode())
    return h.hexdigest()


def _render_chat(messages: list[dict], tokenizer, where: str) -> tuple[str, str]:
    """(prompt text ending in the assistant header, completion text) from the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise CollmError(f"{where}: the tokenizer has no chat template; give prompt/completion rows instead")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise CollmError(f"{where}: the chat template renders the conversation without its own prompt as a prefix")
    return prompt, full[len(prompt) :]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def render_row(row: dict, tokenizer, config: DataConfig, where: str = "row") -> tuple[str, bool, str, int | None]:
    """How one row is written for ``tokenizer``: (prompt text, whether the prompt gets the tokenizer's special
    tokens, completion text, an EOS id appended after the completion's text or None)."""
    if "messages" in row:
        prompt, completion = _render_chat(row["messages"], tokenizer, where)
        return prompt, False, completion, None
    if config.chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        prompt, completion = _render_chat(messages, tokenizer, where)
        return prompt, False, completion, None
    eos = tokenizer.eos_token_id if config.add_eos else None
    return row["prompt"], True, row["completion"], eos


def encode_row(row: dict, tokenizer, config: DataConfig, where: str = "row") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for one row, before truncation.

    Prompt and completion are tokenised separately so the boundary is exact, as decoding will see it:
    the prompt alone is what the model is given.
    """
    prompt, special, completion, eos = render_row(row, tokenizer, config, where)
    completion_ids = _ids(tokenizer, completion, False) + ([eos] if eos is not None else [])
    return _ids(tokenizer, prompt, special), completion_ids


def target_positions(prompt_len: int, completion_len: int, max_len: int) -> list[int]:
    """The completion tokens (by index in the completion) that are targets of a row: those within ``max_len``,
    except a first token nothing predicts."""
    return [k for k in range(completion_len) if 0 < prompt_len + k < max_len]


def _example(prompt_ids: list[int], completion_ids: list[int], max_len: int) -> tuple[Example, bool]:
    """Join, truncate to max_len, and mark targets; returns (example, was truncated)."""
    ids = (prompt_ids + completion_ids)[:max_len]
    mask = ([False] * len(prompt_ids) + [True] * len(completion_ids))[:max_len]
    if mask:
        mask[0] = False  # nothing predicts the first token
    return Example(ids, mask), len(prompt_ids) + len(completion_ids) > max_len


def encode_file(path: str | Path, tokenizer, config: DataConfig | None = None) -> EncodedData:
    """Read and encode a JSONL file with ``tokenizer``; logs a warning when rows were cut or dropped.

    Raises CollmError on malformed rows, or when no row keeps a completion token.
    """
    config = config or DataConfig()
    tokenizer_id = tokenizer_identity(tokenizer)
    stats, examples = EncodeStats(), []
    for i, row in enumerate(read_rows(path)):
        example, truncated = _example(*encode_row(row, tokenizer, config, f"{path} row {i + 1}"), config.max_len)
        stats.rows += 1
        stats.truncated += truncated
        if example.num_targets == 0:
            stats.dropped += 1
            continue
        stats.tokens += len(example.input_ids)
        stats.targets += example.num_targets
        examples.append(example)
    if not examples:
        raise CollmError(f"{path}: no row keeps a completion token within max_len={config.max_len}; raise max_len")
    if stats.truncated or stats.dropped:
        log.warning("%s: %d of %d rows exceed max_len=%d (%d dropped)", path, stats.truncated, stats.rows,
                    config.max_len, stats.dropped)
    fingerprint = data_fingerprint(path, tokenizer_id, config)
    return EncodedData(examples, fingerprint, stats, tokenizer_id, config)


def check_fits(data: EncodedData, context: int | None, who: str) -> None:
    """Refuse rows longer than a model's context, counted, before any model runs on them.

    ``max_len`` cuts rows visibly (counted as truncated); rows that fit max_len but not the model would
    otherwise run past its positions (wrong outputs, or an IndexError for learned positions).
    """
    if not context:
        return
    long = [len(e.input_ids) for e in data.examples if len(e.input_ids) > context]
    if long:
        raise CollmError(f"{len(long)} of {len(data.examples)} rows are longer than the {who}'s context of "
                         f"{context} tokens (longest {max(long)} at max_len {data.config.max_len}): pass "
                         f"--max-len {context} to cut them (counted and reported as truncated)")


def length_order(examples: list[Example]) -> list[int]:
    """Indices longest first (ties by index): batches of similar lengths pad little, and a batch that does
    not fit in memory fails at once rather than at the end."""
    return sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))


def pad_id(tokenizer, eos_ids: tuple[int, ...] = ()) -> int:
    """The id that fills padding (never attended to, so any id works; a real one keeps embeddings in range):
    the tokenizer's pad token, else ``eos_ids`` (else the tokenizer's EOS), else 0."""
    eos = eos_ids or (getattr(tokenizer, "eos_token_id", None),)
    for value in (getattr(tokenizer, "pad_token_id", None), *eos):
        if value is not None:
            return int(value)
    return 0


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file's contents; CollmError naming ``what`` when it is missing, or the line where it is
    not UTF-8."""
    if not Path(path).is_file():
        raise CollmError(f"{what} {str(path)!r} does not exist")
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CollmError(f"{path}:{line}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
