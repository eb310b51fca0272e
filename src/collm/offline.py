"""The one offline switch: collm never reaches for a model hub, whatever library it loads a model through.

Every model collm runs comes from a local folder, a GGUF file inside an installed package, or a completions
server the user names. ``transformers``, ``peft`` and ``huggingface_hub`` would otherwise try the Hugging Face
Hub for names that are not folders (peft looks up a base's ``config.json`` when it saves an adapter), which
on a machine without the internet costs a DNS timeout and prints errors a user cannot act on. A user who wants
the hub for their own code sets ``HF_HUB_OFFLINE=0`` before importing collm.
"""

from __future__ import annotations

import os
import sys

SWITCHES = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def go_offline() -> None:
    """Set the libraries' offline switches (where the user set none), also in an already imported hub client."""
    for name, value in SWITCHES.items():
        os.environ.setdefault(name, value)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and os.environ["HF_HUB_OFFLINE"] not in ("0", "false", "False"):
        hub.HF_HUB_OFFLINE = True
