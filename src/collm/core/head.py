"""The deferral head: a linear map of the base's last hidden state to who writes the next token.

Optionally the map also reads features of the base's own next-token distribution (``features``): its entropy,
its top probability and the log-probability margin between its two best tokens. A hidden state carries them only
through the vocabulary projection, which a linear map cannot undo, and where the base is unsure is where a
stronger model most often writes another token. Such a head needs the base's logits at every step, so the decoding
loop computes them even where the expert writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from collm.errors import CollmError
from collm.tensorfile import write_tensors

# A logit this large saturates sigmoid/softmax to exactly 0 or 1 in float32, which "never"/"always" need.
_SATURATED = 1e4

FEATURES = ("entropy", "max_prob", "margin")
"""What a head can read of the base's next-token distribution besides its hidden state, in this order."""


def parse_features(value: str | tuple | list | None) -> tuple[str, ...]:
    """"entropy,margin" (or a sequence) -> the named features in FEATURES order; "" or None -> ()."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value or ())
    names = [n for n in names if n]
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise CollmError(f"unknown head feature {unknown[0]!r}: choose from {', '.join(FEATURES)}")
    return tuple(n for n in FEATURES if n in names)


def distribution_features(logits: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """(..., V) raw next-token logits -> (..., len(names)) float32: entropy (nats), top probability, and the
    log-probability margin between the two best tokens, in the order of ``names``. Detached: the head reads
    the base's distribution; its loss does not reshape it."""
    logp = F.log_softmax(logits.detach().float(), dim=-1)
    out = []
    top = logp.topk(2, dim=-1).values if {"max_prob", "margin"} & set(names) else None
    for name in names:
        if name == "entropy":
            p = logp.exp()  # a masked (-inf) logit adds 0, not NaN
            out.append(-(p * logp.masked_fill(p == 0, 0.0)).sum(-1))
        elif name == "max_prob":
            out.append(top[..., 0].exp())
        else:
            out.append(top[..., 0] - top[..., 1])
    return torch.stack(out, dim=-1)


def head_inputs(hidden: torch.Tensor, logits: torch.Tensor, features: tuple[str, ...]) -> torch.Tensor:
    """What a head with ``features`` reads: h (..., H) unchanged when there are none, else h followed by those
    features of the base's raw next-token logits at the same positions, float32 (..., H + F)."""
    if not features:
        return hidden
    return torch.cat([hidden.float(), distribution_features(logits, features)], dim=-1)


class DeferralHead(nn.Module):
    """Linear head on the base's last hidden state h_t (and, with ``features``, on features of the base's
    next-token distribution, appended to h_t: see :meth:`inputs`).

    One expert: one logit, pi_t = sigmoid(logit) = P(Z_t = expert). M experts: M+1 logits, softmax over
    [base, expert 1, ..., expert M]. Always computes in float32, whatever the base's dtype.
    """

    def __init__(self, hidden_size: int, num_experts: int = 1, features: str | tuple = ()):
        super().__init__()
        if hidden_size <= 0 or num_experts <= 0:
            raise CollmError(f"head needs hidden_size > 0 and num_experts > 0, got {hidden_size}, {num_experts}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.features = parse_features(features)
        self.linear = nn.Linear(hidden_size + len(self.features), 1 if num_experts == 1 else num_experts + 1,
                                dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def constant(cls, hidden_size: int, defer_prob: float, num_experts: int = 1) -> "DeferralHead":
        """A head that ignores h: P(Z != base) is exactly 0 ("never") or 1 ("always") for the extreme values."""
        head = cls(hidden_size, num_experts)
        if defer_prob in (0.0, 1.0):
            logit = _SATURATED if defer_prob == 1.0 else -_SATURATED
        else:
            logit = float(torch.logit(torch.tensor(defer_prob, dtype=torch.float64)))
        with torch.no_grad():
            if num_experts == 1:
                head.linear.bias.fill_(logit)
            else:  # base logit vs equal expert logits; only the extremes are exact here
                head.linear.bias[0] = -logit
        return head

    @property
    def needs_logits(self) -> bool:
        """Whether the head reads the base's logits (and so needs them at every step)."""
        return bool(self.features)

    def inputs(self, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """What :meth:`forward` takes: h (..., H), or with features h followed by the features of ``logits``
        (the base's raw next-token logits at the same positions, (..., V)), float32 (..., H + F)."""
        if not self.features:
            return hidden
        if logits is None:
            raise CollmError("this head reads the base's next-token distribution: pass the base's logits")
        return head_inputs(hidden, logits, self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states, or (..., H + F) from :meth:`inputs` for a head with features -> raw logits
        (..., 1) for one expert or (..., M+1) for M experts."""
        return self.linear(x.float())

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) or (..., H + F) as for :meth:`forward` -> log P(Z_t = k), k = 0 (base), 1..M (experts):
        shape (..., M+1)."""
        return logits_to_log_probs(self(x))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_probs(x).exp()

    def save(self, path: str | Path) -> None:
        """Write the head as safetensors (atomically), with its shape in the metadata. Raises CollmError for
        NaN or infinite weights (training diverged), which :meth:`load` would refuse."""
        if not all(torch.isfinite(p).all() for p in self.parameters()):
            raise CollmError("the head's weights hold NaN or infinite values (training diverged): lower the "
                             "learning rates (--head-lr, --lr) or enable --clip, and train again")
        meta = {"hidden_size": str(self.hidden_size), "num_experts": str(self.num_experts),
                "features": ",".join(self.features)}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "DeferralHead":
        """Read a head written by :meth:`save`; raises CollmError if the file is missing, not a head, or holds
        NaN or infinite weights (such a head never defers, or always does, without a sign)."""
        path = Path(path)
        if not path.is_file():
            raise CollmError(f"head file {str(path)!r} does not exist")
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            head = cls(int(meta["hidden_size"]), int(meta["num_experts"]), meta.get("features", ""))
            head.load_state_dict(load_file(str(path)))
        except CollmError as e:  # a head whose features this collm does not know (a newer collm wrote it)
            raise CollmError(f"{path}: {e}; upgrade collm to read this head") from None
        except Exception as e:  # noqa: BLE001 - any other failure here means "not a head file"
            raise CollmError(f"{path} is not a deferral head written by collm ({type(e).__name__})") from None
        bad = [name for name, value in head.state_dict().items() if not torch.isfinite(value).all()]
        if bad:
            raise CollmError(f"{path} holds NaN or infinite weights ({', '.join(bad)}): the head is damaged; "
                             f"train it again or restore the file")
        return head


def logits_to_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Head logits (..., 1) or (..., M+1) -> log-probabilities over [base, experts...] (..., M+1)."""
    if logits.shape[-1] == 1:
        return torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)
    return F.log_softmax(logits, dim=-1)
