"""An expert behind an OpenAI-compatible completions server (vLLM, SGLang, llama.cpp's server).

Spec: ``http://HOST:PORT/v1`` or ``http://HOST:PORT/v1#MODEL`` (MODEL picks one of the server's models; without
it the server must serve exactly one). The expert is the big model; it stays where it is served, and a
deferral costs one small request: the row's token ids so far as the prompt, ``max_tokens`` 1, the row's
sampling, and one token id back (never a vocabulary-sized vector). The server's prefix cache holds the
prefix, so each catch-up computes only the tokens the expert has not seen; nothing is cached on this side.

Before the first request the server's tokenizer is compared with the base's (probe strings through its
``/tokenize`` endpoint). Where they differ, ``CoLLM.load`` pairs the two through the text
(collm.backends.cross.RemoteTextExpert: the server reads each row's text and writes text); scoring with such a
server is refused with the first differing token. Failed connections are retried
with backoff until a deadline, then fail with one line naming the URL; every call has a timeout.

Environment: ``COLLM_REMOTE_TIMEOUT`` (seconds one answer may take, default 120) and ``COLLM_REMOTE_RETRY``
(seconds to keep retrying a server that cannot be reached, default 20).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Sequence

import httpx
import torch

from collm.backends.base import Columns, Next
from collm.core.request import Sampling
from collm.errors import CollmError

_PROBES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 12345 67890\n\t",
    "Ünïcödé: café, naïve, 東京, 😀, Привет, مرحبا",
    "  leading spaces, trailing spaces   \n\n\nnew lines",
)
_RETRIED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
            httpx.WriteError, httpx.PoolTimeout)
"""Errors that mean "the server is not (or no longer) there": worth retrying until the deadline. A read
timeout is not among them: the server is alive but slow, and asking again would only add load."""


def is_remote_spec(spec) -> bool:
    """True for an expert spec naming a completions server (``http://HOST:PORT/v1[#MODEL]``)."""
    return isinstance(spec, str) and spec.startswith(("http://", "https://"))


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``http://HOST:PORT/v1[#MODEL]`` -> (base URL without a trailing slash, model name or None)."""
    url, _, model = spec.partition("#")
    url = url.rstrip("/")
    if not is_remote_spec(url) or not httpx.URL(url).host:
        raise CollmError(f"remote expert spec {spec!r} is not http://HOST:PORT/v1[#MODEL]")
    return url, model or None


@dataclass
class _ServedConfig:
    """The part of a transformers config that CoLLM reads from an expert (its context length)."""

    max_position_embeddings: int | None

    def get_text_config(self):
        return self


class RemoteExpert:
    """A connection to one model on a completions server, checked against the base's tokenizer.

    ``RemoteExpert(spec, tokenizer)`` connects (retrying until the deadline), picks the model, checks the
    vocabulary, and raises CollmError when any of it fails. Use :meth:`backbone` for decoding and
    :meth:`gold_and_best` for scoring.
    """

    remote = True

    def __init__(self, spec: str, tokenizer, *, timeout: float | None = None, retry: float | None = None,
                 check: bool = True):
        """``check=False``: connect without comparing vocabularies (call :func:`vocab_mismatch` to compare)."""
        self.url, model = parse_spec(spec)
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.timeout = float(timeout or os.environ.get("COLLM_REMOTE_TIMEOUT", 120))
        self.retry = float(retry if retry is not None else os.environ.get("COLLM_REMOTE_RETRY", 20))
        # connect: how long to wait for a refused/unroutable host; read: one answer (a long scoring batch).
        self.client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=5.0))
        self.model, self.max_model_len, self.root_name = self._pick_model(model)
        self.name_or_path = spec
        self.config = _ServedConfig(self.max_model_len)
        if check:
            check_remote_vocab(self, tokenizer)

    @property
    def identity(self) -> str:
        """sha256 naming the served model as far as the API tells it (URL, model name, its path on the server)."""
        return hashlib.sha256(f"remote:{self.url}#{self.model}:{self.root_name}".encode()).hexdigest()

    def backbone(self) -> "RemoteBackbone":
        return RemoteBackbone(self)

    def close(self) -> None:
        self.client.close()

    # ---------------------------------------------------------------- requests

    def complete(self, prompts: list[list[int]], sampling: Sampling, step: int = 0) -> list[int]:
        """One next token for each prompt (token ids), all in one request; returns their ids in order."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "n": 1, "return_token_ids": True,
                "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "skip_special_tokens": False}
        if sampling.do_sample:
            # vLLM seeds each prompt's sampler with the request's seed: per row and per step, whatever is batched.
            body |= {"temperature": sampling.temperature, "top_p": sampling.top_p,
                     "seed": (sampling.seed * 1_000_003 + step) % (2**31 - 1)}
        else:
            body |= {"temperature": 0.0, "top_p": 1.0}  # explicit: the server's own defaults may sample
        choices = self._choices(self._post("/completions", body), len(prompts))
        ids = []
        for choice in choices:
            tokens = choice.get("token_ids")
            if not tokens:
                raise CollmError(f"the server at {self.url} returned no token ids: it needs the completions "
                                 f"API's return_token_ids (vLLM >= 0.10.2)")
            ids.append(int(tokens[0]))
        return ids

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[dict | None]]:
        """Each prompt's per-position log-probs of its own tokens and the top one (vLLM's ``prompt_logprobs``):
        entry t is {token id (str): {"logprob", "rank", ...}} for position t, None at t = 0."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 1}
        out = []
        for choice in self._choices(self._post("/completions", body), len(prompts)):
            if choice.get("prompt_logprobs") is None:
                raise CollmError(f"the server at {self.url} returned no prompt_logprobs: scoring needs vLLM")
            out.append(choice["prompt_logprobs"])
        return out

    def greedy_verdicts(self, prompts: list[list[int]], at: list[list[int]]) -> list[list[int]]:
        """The expert's greedy token at positions ``at[i]`` of prompt i, in one request (a draft's check):
        position t < len(prompt) reads the top token of ``prompt_logprobs`` there, t = len(prompt) the token
        generated after the prompt."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0, "top_p": 1.0,
                "top_k": 0, "prompt_logprobs": 1, "return_token_ids": True, "skip_special_tokens": False}
        out = []
        for prompt, positions, choice in zip(prompts, at, self._choices(self._post("/completions", body),
                                                                        len(prompts))):
            logprobs, generated = choice.get("prompt_logprobs"), choice.get("token_ids")
            if logprobs is None or not generated:
                raise CollmError(f"the server at {self.url} returned no prompt_logprobs or token ids: checking "
                                 f"drafts needs vLLM >= 0.10.2")
            picked = []
            for t in positions:
                if t == len(prompt):
                    picked.append(int(generated[0]))
                else:
                    entries = logprobs[t]
                    top = min(entries.items(), key=lambda kv: (kv[1].get("rank", 1), -kv[1]["logprob"]))
                    picked.append(int(top[0]))
            out.append(picked)
        return out

    def gold_and_best(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor):
        """For scoring (collm.training.score): the gold token's log-prob and the best log-prob (N,) each, at the
        N targets, row-major; right-padded rows are sent without their padding."""
        lengths = attention_mask.sum(1).tolist()
        ids = input_ids.cpu()
        answers = self.prompt_logprobs([ids[r, :n].tolist() for r, n in enumerate(lengths)])
        gold, best = [], []
        for r, (answer, n) in enumerate(zip(answers, lengths)):
            for t in targets[r, 1:n].nonzero().flatten().add(1).tolist():
                gold.append(float(answer[t][str(int(ids[r, t]))]["logprob"]))
                best.append(max(float(e["logprob"]) for e in answer[t].values()))  # gold and the top one
        return torch.tensor(gold, dtype=torch.float32), torch.tensor(best, dtype=torch.float32)

    def tokenize(self, text: str) -> list[int]:
        """The server's token ids for ``text`` (no special tokens added), through vLLM's ``/tokenize``."""
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return [int(t) for t in self._post("/tokenize", body, root=True)["tokens"]]

    def complete_text(self, prompts: list[str], sampling: Sampling, step: int = 0, *, max_tokens: int = 1,
                      add_special_tokens: bool = True) -> list[tuple[str, bool]]:
        """The text of the next ``max_tokens`` tokens after each prompt (text, tokenized by the server), and
        whether the model ended there (its end of text); special tokens add no text."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": max_tokens, "n": 1, "top_k": 0,
                "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "skip_special_tokens": True, "add_special_tokens": add_special_tokens}
        if sampling.do_sample:
            body |= {"temperature": sampling.temperature, "top_p": sampling.top_p,
                     "seed": (sampling.seed * 1_000_003 + step) % (2**31 - 1)}
        else:
            body |= {"temperature": 0.0, "top_p": 1.0}
        return [(str(c.get("text") or ""), c.get("finish_reason") == "stop")
                for c in self._choices(self._post("/completions", body), len(prompts))]

    def chat_turn(self, sentinel: str) -> str | None:
        """The served chat template rendered around one user turn whose content is ``sentinel`` (generation
        prompt included), through vLLM's ``/tokenize`` and ``/detokenize``; None where it has no template."""
        body = {"model": self.model, "messages": [{"role": "user", "content": sentinel}],
                "add_generation_prompt": True, "add_special_tokens": False}
        try:
            ids = self._post("/tokenize", body, root=True)["tokens"]
        except Refused as e:  # a server with no chat template answers 400; anything else is a real error
            if e.status != 400:
                raise
            return None
        return str(self._post("/detokenize", {"model": self.model, "tokens": ids}, root=True)["prompt"])

    def _pick_model(self, model: str | None) -> tuple[str, int | None, str]:
        served = self._get("/models").get("data", [])
        names = [m.get("id") for m in served]
        if model is None and len(served) != 1:
            raise CollmError(f"the server at {self.url} serves {len(served)} models ({', '.join(map(str, names))}):"
                             f" name one as {self.url}#MODEL")
        entry = served[0] if model is None else next((m for m in served if m.get("id") == model), None)
        if entry is None:
            raise CollmError(f"the server at {self.url} does not serve {model!r}; "
                             f"it serves {', '.join(map(str, names))}")
        return entry["id"], entry.get("max_model_len"), str(entry.get("root", entry["id"]))

    def _choices(self, answer: dict, count: int) -> list[dict]:
        choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != count:
            raise CollmError(f"the server at {self.url} answered {len(choices)} choices for {count} prompts")
        return choices

    def _get(self, path: str) -> dict:
        return self._send("GET", self.url + path, None)

    def _post(self, path: str, body: dict, *, root: bool = False) -> dict:
        return self._send("POST", (self.root if root else self.url) + path, body)

    def _send(self, method: str, url: str, body: dict | None) -> dict:
        """One request, retried with backoff while the server cannot be reached, until ``retry`` seconds."""
        deadline = time.monotonic() + self.retry
        delay = 0.1
        while True:
            try:
                response = self.client.request(method, url, json=body)
            except _RETRIED as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            except httpx.TimeoutException:
                raise CollmError(f"the expert server at {url} did not answer within {self.timeout:.0f}s "
                                 f"(COLLM_REMOTE_TIMEOUT)") from None
            else:
                if response.status_code < 500:
                    return self._json(response, url)
                problem = f"HTTP {response.status_code}"
            if time.monotonic() + delay > deadline:
                raise CollmError(f"cannot reach the expert server at {url}: {problem} "
                                 f"(retried for {self.retry:.0f}s, COLLM_REMOTE_RETRY)")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    @staticmethod
    def _json(response: httpx.Response, url: str) -> dict:
        try:
            answer = response.json()
        except ValueError:
            answer = {"message": response.text[:200]}
        if response.status_code >= 400:
            error = answer.get("error", answer) if isinstance(answer, dict) else answer
            message = error.get("message", error) if isinstance(error, dict) else error
            raise Refused(f"the expert server at {url} refused the request (HTTP {response.status_code}): {message}",
                          response.status_code)
        return answer


class Refused(CollmError):
    """The expert server answered a request with an HTTP error below 500 (``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_remote_vocab(expert: RemoteExpert, tokenizer, name: str = "base") -> None:
    """Tokenize probe strings (fixed ones, the chat template's frame, and text decoded from ids spread over
    the whole vocabulary) locally and on the server; raise CollmError at the first token that differs."""
    problem = vocab_mismatch(expert, tokenizer, name)
    if problem:
        raise CollmError(problem)


def vocab_mismatch(expert: RemoteExpert, tokenizer, name: str = "base") -> str | None:
    """What :func:`check_remote_vocab` would raise (the first token that differs), or None: one vocabulary."""
    if tokenizer is None:
        raise CollmError(f"a remote expert ({expert.url}) needs the base's tokenizer to check its vocabulary")
    spread = list(range(0, len(tokenizer), max(len(tokenizer) // 512, 1)))
    probes = [*_PROBES, tokenizer.decode(spread, skip_special_tokens=True)]
    if getattr(tokenizer, "chat_template", None):
        probes.append(tokenizer.apply_chat_template([{"role": "user", "content": _PROBES[0]}], tokenize=False,
                                                    add_generation_prompt=True))
    for probe in probes:
        local = tokenizer(probe, add_special_tokens=False)["input_ids"]
        served = expert.tokenize(probe)
        for i, (a, b) in enumerate(zip(local + [None], served + [None])):
            if a != b:
                token = tokenizer.convert_ids_to_tokens(a) if a is not None else "(end)"
                return (f"vocabularies differ: the {name} reads {probe!r} with token {i} = {token!r} "
                        f"(id {a}) but the expert at {expert.url} has id {b}")
    return None


class RemoteBackbone:
    """The :class:`~collm.backends.base.Backbone` of a remote expert: it picks tokens on the server.

    The server keeps the prefix (its prefix cache), so this side holds no cache: ``keep``, ``pad_left`` and
    ``extend`` only keep ``seen`` in the column layout. Rows that need a token in the same step go in one
    request per distinct sampling setting.
    """

    picks = True

    def __init__(self, expert: RemoteExpert):
        self.expert = expert
        self.seen = 0

    def read(self, cols: Columns, end: int, *, hidden: bool = False, rows: Sequence[int] | None = None,
             sampling: Sequence[Sampling] | None = None, step: int = 0,
             check: Sequence[tuple[int, int]] | None = None) -> Next:
        if hidden:
            raise CollmError(f"the remote expert at {self.expert.url} has no hidden states to give")
        self.seen = end
        if check:  # a draft's check: one request, each row's greedy token at its checked columns
            by_row: dict[int, list[int]] = {}
            for row, column in check:
                by_row.setdefault(int(row), []).append(int(column))
            order = sorted(by_row)
            # column c holds the row's token number positions[c] (its real tokens before it); end: the next one
            at = [[int(cols.positions[r, c]) if c < end else len(cols.row_ids(r, end)) for c in by_row[r]]
                  for r in order]
            verdicts = self.expert.greedy_verdicts([cols.row_ids(r, end) for r in order], at)
            found = {(r, c): v for r, vs in zip(order, verdicts) for c, v in zip(by_row[r], vs)}
            return Next(checked=torch.tensor([found[(int(r), int(c))] for r, c in check], dtype=torch.long))
        asked = list(range(cols.rows)) if rows is None else [int(r) for r in rows]
        groups: dict[Sampling, list[int]] = {}
        for row in asked:
            groups.setdefault(sampling[row] if sampling is not None else Sampling(), []).append(row)
        tokens = torch.full((cols.rows,), -1, dtype=torch.long)
        for setting, group in groups.items():
            picked = self.expert.complete([cols.row_ids(r, end) for r in group], setting, step)
            tokens[group] = torch.tensor(picked, dtype=torch.long)
        return Next(tokens=tokens)

    def keep(self, rows: torch.Tensor) -> None:
        pass

    def cut(self, columns: int) -> None:
        self.seen = min(self.seen, columns)

    def pad_left(self, columns: int) -> None:
        self.seen += columns

    def fresh(self, rows: int = 0) -> "RemoteBackbone":
        return RemoteBackbone(self.expert)

    def extend(self, other: "RemoteBackbone") -> None:
        pass
