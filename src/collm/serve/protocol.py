"""OpenAI's request and response shapes for completions and chat, plus collm's extras.

The extras are fields an OpenAI client ignores: a request may carry ``threshold`` and ``mode``; each choice
carries ``provenance`` (per token: id, text piece, source, defer probability); ``usage`` adds
``expert_tokens`` and ``defer_rate``. Options that OpenAI defines but collm does not implement are accepted
only at their neutral value, so a client that sets one gets a 400 naming it rather than a silent no-op.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from collm.core.seed import MAX_SEED

MAX_LOOKAHEAD = 64
"""The longest draft a request may ask for."""

SERVED_MODES = ("collm", "base", "expert")

# OpenAI options collm does not implement, with the value that means "off": anything else is refused.
UNSUPPORTED = {
    "n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "suffix": None,
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "tools": None, "tool_choice": None,
    "functions": None, "function_call": None, "response_format": None, "parallel_tool_calls": None,
}


def check_text(value: str) -> str:
    """Text a tokenizer can read: JSON may carry a lone surrogate (``"\\ud800"``), which is no Unicode text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(value[e.start]):04X} at character {e.start}), which is "
                         f"not Unicode text: send valid text") from None
    return value


Text = Annotated[StrictStr, AfterValidator(check_text)]
"""Every string a request carries: checked once here, for every endpoint."""


class _Strict(BaseModel):
    # An unknown field is an error (as OpenAI's API does), not silently dropped.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send one last chunk, with empty choices, that carries the usage of the whole request."""


class _Common(_Strict):
    model: Text
    max_tokens: StrictInt | None = Field(None, ge=1, description="Most new tokens (the server caps it).")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False,
                               description="0: greedy; otherwise sample at this temperature.")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED,
                                   description="Same seed, same sampled tokens; random if absent.")
    stop: Text | list[Text] | None = Field(None, description="Up to 4 strings; the text ends before the first.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # collm's extras
    threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                    description="collm: defer where P(expert) exceeds this; default: the server's.")
    mode: Literal["collm", "base", "expert"] = Field(
        "collm", description="collm: the head routes; base / expert: one model alone.")
    lookahead: StrictInt | None = Field(None, ge=1, le=MAX_LOOKAHEAD, description=(
        "collm: draft past deferrals, up to this many tokens per check (1: none); default: the server's."))
    rewind: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description=(
        "collm: the expert re-writes a base token it gives a probability below this; default: the server's."))
    yield_below: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description=(
        "collm: the base's token stands where the expert's own is less probable than this; default: the server's."))
    max_rewinds: StrictInt | None = Field(None, ge=0, le=1024, description="collm: most rewinds per answer.")
    # OpenAI options accepted only at their neutral value (see UNSUPPORTED)
    n: StrictInt | None = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict | None = None
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    def unsupported(self) -> str | None:
        """The first OpenAI option set to something collm does not implement, as a message; else None."""
        for name, neutral in UNSUPPORTED.items():
            value = getattr(self, name, neutral)
            if value is not None and value != neutral and not (value == 0 and neutral is None):
                what = "n other than 1" if name == "n" else f"{name}={value!r}"
                return f"{what} is not supported by this server"
        return None


TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(_Common):
    prompt: Text | TokenIds | list[Text] | list[TokenIds] = Field(
        description="Raw text (no chat template) or token ids; a list gives one choice per prompt.")
    echo: bool | None = None
    best_of: StrictInt | None = None
    suffix: Text | None = None

    def prompts(self) -> list:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="Same as max_tokens (its newer name).")
    top_logprobs: StrictInt | None = None
    tools: list | None = None
    tool_choice: Union[Text, dict, None] = None
    functions: list | None = None
    function_call: Union[Text, dict, None] = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---------------------------------------------------------------- responses


class TokenProvenance(BaseModel):
    """Who wrote one token."""

    token_id: int
    text: str
    """What the token adds to the text ("" for part of a character; the pieces join to the text)."""
    source: int
    """0 = base, k = expert k."""
    defer_prob: float
    """The head's P(expert writes this token)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    expert_tokens: int = 0
    """collm: completion tokens an expert wrote."""
    defer_rate: float = 0.0
    """collm: expert_tokens / completion_tokens."""

    @classmethod
    def of(cls, prompt_tokens: int, sources: list[int]) -> "Usage":
        expert = sum(1 for s in sources if s)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=len(sources),
                   total_tokens=prompt_tokens + len(sources), expert_tokens=expert,
                   defer_rate=expert / len(sources) if sources else 0.0)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None
    provenance: list[TokenProvenance]


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: str | None
    provenance: list[TokenProvenance]


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "collm"
    base: str = ""
    """collm: the base model's spec."""
    experts: list[str] = []
    """collm: the experts' specs, in source order (expert k is experts[k-1])."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
