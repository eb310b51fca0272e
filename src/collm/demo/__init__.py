"""The embedded default: a Co-LLM run shipped with the package, and what `collm demo` shows with it.

``shipped`` (where the run is, its manifest check, loading it), ``package`` (building it from a
reproduction's runs), ``command`` (`collm demo`).
"""

from collm.demo.command import run
from collm.demo.package import deferral_summary, package, provenance_text, summarise, table
from collm.demo.shipped import ASSETS, PAIRS, QWEN_ASSETS, load_pair, verify, write_manifest

__all__ = ["ASSETS", "PAIRS", "QWEN_ASSETS", "deferral_summary", "load_pair", "package", "provenance_text", "run",
           "summarise", "table", "verify", "write_manifest"]
