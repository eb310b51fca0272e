"""The shipped run behind `collm demo` (``collm/assets/gsm/``): where it is, its manifest, loading it.

The folder holds a run made by ``scripts/reproduce.sh``: the math expert as a LoRA adapter (``expert/``), the
Co-LLM base's adapter (``base_adapter/`` or ``sft_base/``), the deferral head, ``collm.json``, the results table
the demo prints (``results.md``) and the held-out problems it answers; the full results and the calibration plot
are in ``docs/results/smollm2/``.
``manifest.json`` records every file's sha256; `verify` refuses to load a run that does not match.
"""

from __future__ import annotations

from pathlib import Path

from collm.run import MANIFEST, SHIPPED

ASSETS = SHIPPED["smollm2"]
QWEN_ASSETS = SHIPPED["qwen"]  # needs `bash scripts/install.sh --qwen`
PAIRS = SHIPPED


def write_manifest(folder: Path) -> dict:
    """Record the sha256 and size of every file under `folder` (but the manifest) in manifest.json."""
    from collm.run import seal

    return seal(folder, [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST])


def verify(folder: Path = ASSETS) -> dict:
    """Check every file recorded in the manifest is there with its sha256; CollmError naming the first that
    is missing or differs. Returns the manifest."""
    from collm.run import verify_manifest

    return verify_manifest(folder, missing=f"{folder} has no {MANIFEST}: the shipped run is missing; "
                                           "run scripts/reproduce.sh")


def load_pair(folder: Path = ASSETS, device: str = "cpu", dtype: str | None = None):
    """A shipped Co-LLM run (for ASSETS: embedded SmolLM2 + its base adapter, the expert adapter, the head),
    after checking every file against the manifest. ``dtype``: default the run's."""
    from collm.pair import CoLLM

    verify(folder)
    return CoLLM.from_pretrained(folder, device=device, dtype=dtype)
