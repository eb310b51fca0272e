"""`CoLLM`: a base, its experts, the deferral head and the tokenizer they share; saving and loading runs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from collm.backends.cross import CrossExpert, RemoteTextExpert, same_vocab
from collm.backends.models import check_shapes, load_model
from collm.backends.prepack import available
from collm.backends.remote import RemoteExpert, is_remote_spec, vocab_mismatch
from collm.core.head import DeferralHead
from collm.core.request import Request, Router, check_threshold, make_request
from collm.data.rows import pad_id
from collm.decoding.decode import Options, decode, run
from collm.decoding.engine import Engine
from collm.errors import CollmError
from collm.run import (
    DEFAULT_RUN,
    HEAD_FILE,
    check_head,
    read_run_config,
    resolve_run,
    seal,
    spec_in,
    write_run_config,
)


@dataclass
class PairSpec:
    """Which pair to load: the model options ``collm generate`` and ``collm serve`` share."""

    run: str | None = None
    """A trained run folder (collm.json), or a shipped run by name (smollm2, qwen); replaces --base/--expert/--head.
    Default, when no model option is given: the shipped SmolLM2 run (tuned base, math expert, trained head and its
    threshold), as `collm demo` uses."""
    base: str | None = None
    """Base model: HF folder, .gguf file, or a named model such as smollm2-135m-instruct (the default once any
    model option is given)."""
    expert: list[str] = field(default_factory=list)
    """Expert model (repeat for several): a spec, or a completions server http://HOST:PORT/v1[#MODEL]. Default:
    the embedded model."""
    head: str | None = None
    """Deferral head: a .safetensors file, or by name: 'zero' (P(defer) = 0.5 everywhere: with one expert the
    default threshold 0.5 never defers), 'never' or 'always'. Default with --base/--expert: zero."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""
    dtype: str | None = None
    """float32, bfloat16 or float16. Default: the run's, else float32."""

    def __post_init__(self):
        self.expert = [self.expert] if isinstance(self.expert, str) else list(self.expert or [])

    @property
    def names_models(self) -> bool:
        """Whether any model option is given (else the default run is loaded)."""
        return not (self.run is None and self.base is None and not self.expert and self.head is None)

    def load(self) -> "CoLLM":
        """The pair: the run, or the models with the head, or (no model option) the shipped default run."""
        if self.run is not None or not self.names_models:
            return CoLLM.from_pretrained(self.run or DEFAULT_RUN, device=self.device, dtype=self.dtype)
        from collm.backends.models import EMBEDDED_DEFAULT

        return CoLLM.load(self.base or EMBEDDED_DEFAULT, self.expert or [EMBEDDED_DEFAULT], self.head,
                          device=self.device, dtype=self.dtype or "float32")


@dataclass
class GenerateOutput:
    """What :meth:`CoLLM.generate` returns; every list has one entry per prompt, new tokens only."""

    texts: list[str]
    token_ids: list[list[int]]
    sources: list[list[int]]
    """Who wrote each token: 0 = base, k = expert k (1-based)."""
    defer_probs: list[list[float]]
    """P(Z_t != base) from the head at each new token (0 where the head was not consulted)."""
    stopped_by: list[str | None]
    stats: dict = field(default_factory=dict)
    """new_tokens, deferred_tokens, defer_rate, expert_calls (catch-ups at deferrals), expert_tokens (positions
    they read), expert_prefill_tokens (the prompt positions the experts read up front, with the base), steps,
    seconds, tokens_per_s."""


class CoLLM:
    """A base model that writes, experts that write where the head defers to them, and one tokenizer.

    ``CoLLM(base, experts, head=None, tokenizer=...)`` takes loaded ``transformers`` causal LMs; ``head=None``
    gives a zero-initialised :class:`DeferralHead` (P(defer) = 0.5 with one expert).
    """

    def __init__(self, base, experts, head: DeferralHead | None = None, tokenizer=None, *, threshold: float = 0.5,
                 info: dict | None = None):
        experts = list(experts) if isinstance(experts, (list, tuple)) else [experts]
        self.vocab = check_shapes(base, experts, tokenizer)
        hidden = base.config.get_text_config().hidden_size
        self._default_head = head is None  # said once per pair: a zero head never defers at threshold >= 0.5
        if head is None:
            head = DeferralHead(hidden, max(len(experts), 1))
        if head.hidden_size != hidden:
            raise CollmError(f"head expects hidden size {head.hidden_size} but the base has {hidden}")
        if experts and head.num_experts != len(experts):
            raise CollmError(f"head has outputs for {head.num_experts} experts but {len(experts)} were given")
        self.base, self.experts, self.tokenizer = base, experts, tokenizer
        self.head = head.to(next(base.parameters()).device)
        self.threshold = check_threshold(threshold)
        self.specs: dict = {}  # the specs `load` loaded the models from, where it did
        self._runners: dict = {}  # static runners and fused steps (GPU): the engine's state, not the models'
        self.info = dict(info or {})

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def load(cls, base: str, experts: list[str], head: str | None = None, *, threshold: float = 0.5,
             device: str = "cpu", dtype: str = "float32") -> "CoLLM":
        """Load models by spec (folder, .gguf, adapter folder or the embedded default; for experts also a
        completions server, ``http://HOST:PORT/v1[#MODEL]``, see collm.backends.remote) and a head.

        ``head``: a head file, ``"zero"`` (P(defer) = 0.5 everywhere), ``"never"``/``"always"`` (a constant
        head), or None: a zero head, with a warning at the first request where it can never defer.
        """
        base_model, tokenizer = load_model(base, device=device, dtype=dtype)
        expert_models = []
        for spec in experts:
            if is_remote_spec(spec):  # served elsewhere: connect and compare its vocabulary by tokenizing
                served = RemoteExpert(spec, tokenizer, check=False)
                # another vocabulary: the two collaborate through the text (collm.backends.cross)
                expert_models.append(served if vocab_mismatch(served, tokenizer) is None
                                     else RemoteTextExpert(served, tokenizer))
                continue
            model, expert_tokenizer = load_model(spec, device=device, dtype=dtype)
            if same_vocab(tokenizer, expert_tokenizer):
                expert_models.append(model)
            else:  # another family: the two collaborate through the text (collm.backends.cross)
                expert_models.append(CrossExpert(model, expert_tokenizer, tokenizer))
        hidden = base_model.config.get_text_config().hidden_size
        n = max(len(experts), 1)
        if head in ("never", "always"):
            head_module = DeferralHead.constant(hidden, 1.0 if head == "always" else 0.0, n)
        elif head == "zero":
            head_module = DeferralHead(hidden, n)
        else:
            head_module = DeferralHead.load(head) if head else None
        info = {"base": base, "experts": list(experts), "dtype": dtype, "base_weights": "original"}
        pair = cls(base_model, expert_models, head_module, tokenizer, threshold=threshold, info=info)
        pair.specs = {"base": base, "experts": list(experts)}  # as loaded (info may be replaced by a run's config)
        return pair

    @classmethod
    def from_pretrained(cls, run_dir: str | Path = DEFAULT_RUN, *, device: str = "cpu",
                        dtype: str | None = None) -> "CoLLM":
        """Load a run folder written by :meth:`save_pretrained` or by ``collm train``, after checking every
        file against the run's manifest (see :mod:`collm.run`). A shipped run may be named instead of a folder:
        ``"smollm2"`` (the default: the embedded SmolLM2 with its tuned base, math expert and head) or ``"qwen"``."""
        run_dir = resolve_run(run_dir)
        config = read_run_config(run_dir)
        dtype = dtype or config.get("dtype", "float32")
        weights = config.get("base_weights", "original")
        base_spec = str(run_dir / "base") if weights == "full" else spec_in(run_dir, config["base"])
        experts = [spec_in(run_dir, spec) for spec in config["experts"]]
        pair = cls.load(base_spec, experts, str(run_dir / HEAD_FILE), threshold=config.get("threshold", 0.5),
                        device=device, dtype=dtype)
        check_head(pair.head, config, run_dir)
        if weights == "lora":
            pair.base = _merge_adapter(pair.base, run_dir / "base_adapter")
        pair.info = config
        return pair

    def save_pretrained(self, run_dir: str | Path, **extra) -> None:
        """Write ``collm.json`` and the head; a LoRA-wrapped base saves its adapter to ``base_adapter/``;
        then ``manifest.json``, the sha256 of each file, which every load checks."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.head.save(run_dir / HEAD_FILE)
        weights = self.info.get("base_weights", "original")
        if hasattr(self.base, "peft_config"):
            self.base.save_pretrained(run_dir / "base_adapter", save_embedding_layers=False)  # no hub lookup
            weights = "lora"
        config = {**self.info, "base_weights": weights, "threshold": self.threshold, **extra}
        config.setdefault("base", getattr(self.base, "name_or_path", ""))
        config.setdefault("experts", [getattr(e, "name_or_path", "") for e in self.experts])
        config = config | {"num_experts": self.head.num_experts, "hidden_size": self.head.hidden_size}
        config.pop("head_features", None)
        if self.head.features:
            config["head_features"] = list(self.head.features)
        write_run_config(run_dir, config)
        seal(run_dir)

    # ---------------------------------------------------------------- generation

    def generate(self, prompts=None, request: Request | None = None, *, input_ids=None, chat: bool = True,
                 router: Router | None = None, compile: bool = False, on_token=None, **options) -> GenerateOutput:
        """Write an answer to each prompt together: :meth:`stream`, collected.

        ``prompts``: a string, a list of strings (rendered with the base's chat template unless ``chat=False``),
        or token ids (a 2-D LongTensor or a list of lists; also accepted as ``input_ids=``). What to write is a
        :class:`Request` (default: this pair's threshold, 128 new tokens, greedy), given as ``request`` and/or
        as keyword ``options`` that replace its fields (collm.core.request.OPTIONS): ``max_new_tokens``,
        ``threshold`` (defer where P(Z != base) exceeds it), ``do_sample``, ``temperature``, ``top_p``, ``seed``,
        ``stop``, ``mode``: ``collm`` (route by the head), ``compose`` (sample the mixture), ``base`` or
        ``expert`` (one model alone, for baselines), ``proxy`` (proxy tuning, for a pair made by
        :func:`proxy_tuning`), and ``lookahead``: at a deferral the base drafts on, up to this many tokens, and
        the expert checks the draft in one read (greedy rows get greedy Co-LLM's tokens and writers, exactly in
        float32; sampling rows keep Co-LLM's distribution); with ``mode="expert"`` that is speculative decoding.
        Backtracking (off by default): ``rewind`` (the expert re-writes a base token it gives a probability below
        this), ``yield_below`` (the base's token where the expert's own is less probable than this) and
        ``max_rewinds`` per answer.
        ``router`` overrides the threshold rule.
        ``compile`` (CUDA): torch.compile the static-cache steps; the first calls take minutes, later ones run
        fastest. ``on_token(tokens, sources, done)`` is called after each step with every row's new token and
        writer, for streaming (once per token: a check can settle several tokens of a row in one step).
        Raises CollmError for empty prompts, an unknown option, max_new_tokens <= 0, a threshold outside [0, 1],
        an unknown mode.
        """
        prompts = _prompts_or_ids(prompts, input_ids)
        request = self.request(request, router=router, **options)
        ids = self._prepare(prompts, chat, request)
        raw = decode(self.base, self.experts, self.head, ids, max_new_tokens=request.max_new_tokens,
                     threshold=request.threshold, sampling=request.sampling, mode=request.mode, stop=request.stop,
                     lookahead=request.lookahead, rewind=request.rewind, yield_below=request.yield_below,
                     max_rewinds=request.max_rewinds, on_token=on_token, **self._options(router, compile))
        return GenerateOutput(raw.texts, raw.token_ids, raw.sources, raw.defer_probs, raw.stopped_by, raw.stats)

    def stream(self, prompts=None, request: Request | None = None, *, input_ids=None, chat: bool = True,
               router: Router | None = None, compile: bool = False, **options):
        """Like :meth:`generate` (the same ``request`` and ``options``), but yields each step's events as they are
        written: a list of :class:`collm.core.request.TokenEvent` (row = the prompt's index; token id, text
        piece, source, defer_prob, finished). The text pieces of a row join to its ``generate`` text."""
        prompts = _prompts_or_ids(prompts, input_ids)
        request = self.request(request, router=router, **options)
        ids = self._prepare(prompts, chat, request)
        yield from run(self.base, self.experts, self.head, ids, request, Options(**self._options(router, compile)))

    def engine(self) -> Engine:
        """A decoding engine over this pair's models that rows can join and leave between steps (for serving):
        ``add(prompt_ids, Request) -> handle``, ``step() -> [TokenEvent]``, ``drop(handle)``."""
        device = next(self.base.parameters()).device
        return Engine(self.base, self.experts, self.head, vocab=self.vocab, eos_ids=self._eos_ids(),
                      pad_id=self._pad_id(), tokenizer=self.tokenizer, mode="collm" if self.experts else "base",
                      prepack=available(device))

    def request(self, request: Request | None = None, *, router: Router | None = None, **options) -> Request:
        """A checked :class:`Request` for this pair: ``request`` (default: one with this pair's threshold) with
        ``options`` replacing its fields (collm.core.request.make_request), and what this pair can serve: modes
        that need experts, proxy tuning's three models, stop strings' tokenizer. ``router``: the rule that will
        route instead of the threshold (a zero head is then not warned about)."""
        request = make_request(request or Request(threshold=self.threshold), **options)
        mode, threshold = request.mode, request.threshold
        if mode != "base" and not self.experts:
            raise CollmError(f"mode {mode!r} needs at least one expert")
        if mode == "proxy" and len(self.experts) != 2:
            raise CollmError("mode 'proxy' needs a pair made by collm.pair.proxy_tuning(expert, tuned, untuned, ...)")
        if request.stop and self.tokenizer is None:
            raise CollmError("stop strings need a tokenizer")
        if self._default_head and mode == "collm" and router is None and len(self.experts) == 1 \
                and threshold >= 0.5:
            self._default_head = False
            warnings.warn(f"no head was given: the zero head gives P(defer) = 0.5, which never exceeds threshold "
                          f"{threshold:g}, so the expert writes nothing; train a head, or pass a threshold below "
                          "0.5", UserWarning, stacklevel=3)
        return request

    def _prepare(self, prompts, chat: bool, request: Request) -> list[list[int]]:
        ids = self.encode(prompts, chat=chat)
        self._check_context(max(len(p) for p in ids) + request.max_new_tokens)
        return ids

    def _options(self, router, compile: bool) -> dict:
        return dict(vocab=self.vocab, eos_ids=self._eos_ids(), pad_id=self._pad_id(), tokenizer=self.tokenizer,
                    router=router, compile=compile, runners=self._runners)

    def encode(self, prompts, *, chat: bool = True) -> list[list[int]]:
        """Prompts (strings or ids) -> lists of token ids; raises CollmError on an empty or out-of-vocab prompt."""
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2 or prompts.dtype != torch.long:
                raise CollmError("input_ids must be a 2-D LongTensor (batch, length)")
            prompts = prompts.tolist()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise CollmError("give at least one prompt: a string, a list of strings or a list of token-id lists")
        ids = [self._encode_one(p, chat) for p in prompts]
        for row, seq in enumerate(ids):
            if not seq:
                raise CollmError(f"prompt {row} is empty")
            bad = next((t for t in seq if not (isinstance(t, int) and 0 <= t < self.vocab)), None)
            if bad is not None:
                raise CollmError(f"prompt {row} holds token id {bad!r}, outside the vocabulary [0, {self.vocab})")
        return ids

    def _encode_one(self, prompt, chat: bool) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if not prompt.strip():
            return []
        if self.tokenizer is None:
            raise CollmError("this pair has no tokenizer: pass token ids instead of strings")
        if chat and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    def _check_context(self, length: int) -> None:
        """Refuse a request longer than a model's context (learned positions would fail with an index error)."""
        for name, model in [("base", self.base), *((f"expert {k}", m) for k, m in enumerate(self.experts, 1))]:
            config = model.config.get_text_config()
            limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
            if limit and length > limit:
                raise CollmError(f"the longest prompt plus max_new_tokens is {length} tokens but the {name}'s "
                                 f"context is {limit}: shorten the prompt or lower max_new_tokens")

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set()
        for value in (getattr(self.tokenizer, "eos_token_id", None),
                      getattr(getattr(self.base, "generation_config", None), "eos_token_id", None)):
            ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
        return tuple(sorted(ids))

    def _pad_id(self) -> int:
        return pad_id(self.tokenizer, self._eos_ids())


def proxy_tuning(expert, tuned, untuned, tokenizer=None) -> CoLLM:
    """A pair that decodes by proxy tuning (Liu et al., 2024), the baseline the Co-LLM paper compares with:
    each token from log p_expert + log p_tuned - log p_untuned, where ``tuned`` is the fine-tuned small model
    and ``untuned`` its original. Use ``generate(..., mode="proxy")``; all three models run every step."""
    hidden = tuned.config.get_text_config().hidden_size
    return CoLLM(tuned, [expert, untuned], DeferralHead(hidden, 2), tokenizer, info={"proxy": True})


def _prompts_or_ids(prompts, input_ids):
    """``generate(prompts)`` or ``generate(input_ids=...)``, the keyword ``transformers`` users type."""
    if (prompts is None) == (input_ids is None):
        raise CollmError("give the prompts (strings or token ids) or input_ids, not both and not neither")
    return prompts if input_ids is None else input_ids


def _merge_adapter(base, adapter_dir: Path):
    from peft import PeftModel

    if not adapter_dir.is_dir():
        raise CollmError(f"run says the base is LoRA-tuned but {adapter_dir} is missing")
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
