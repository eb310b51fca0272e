"""Collaborative decoding of a base and expert language models (Co-LLM, Shen et al., ACL 2024)."""

from collm.offline import go_offline

go_offline()  # before anything imports transformers, peft or huggingface_hub


from collm.core.head import DeferralHead
from collm.errors import CollmError
from collm.pair import CoLLM, GenerateOutput

__all__ = ["CoLLM", "CollmError", "DeferralHead", "GenerateOutput"]
__version__ = "0.1.0"
