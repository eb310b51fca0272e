"""Training checkpoints: trainable weights, optimizer and scheduler state, RNG, step — safetensors + JSON.

Only what training changes is saved (head, LoRA or full base weights), not a frozen base, and nothing is
pickled. A checkpoint is written into a temporary folder and renamed into place, then ``latest`` is
rewritten atomically, so a kill at any moment leaves the previous checkpoint whole.
Covers single-process and DDP runs (every rank holds the same weights and optimizer state);
sharded FSDP/DeepSpeed states would need ``Accelerator.save_state``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from collm.atomic import TEMP_SUFFIX, atomic_folder, remove, temp_siblings, write_json, write_text
from collm.errors import CollmError
from collm.tensorfile import write_tensors

LATEST = "latest"
_STEP = re.compile(r"step-\d{6}")
# What save_checkpoint writes into its folder, and the temporary names a kill can leave.
_OWN = re.compile(rf"(?:step-\d{{6}}|{LATEST})|\.(?:step-\d{{6}}|{LATEST})\.{TEMP_SUFFIX}")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, by name: what a checkpoint must restore."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and the JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> torch.Tensor:
    """This process's RNG (dropout in LoRA layers draws from it); gather one per rank for the checkpoint."""
    return torch.get_rng_state()


def save_checkpoint(folder: Path, step: int, module, optimizer, scheduler, extra: dict, rng_states: list,
                    keep: int = 2) -> Path:
    """Write ``folder/step-XXXXXX`` atomically and point ``folder/latest`` at it; keep the newest ``keep``.

    Call on the main process only; ``rng_states`` holds :func:`rng_state` of every rank, in rank order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"

    def write(tmp: Path) -> None:
        write_tensors(tmp / "trainable.safetensors", trainable_state(module))
        tensors, meta = _optimizer_tensors(optimizer)
        write_tensors(tmp / "optimizer.safetensors", tensors, {"meta": json.dumps(meta, sort_keys=True)})
        write_tensors(tmp / "rng.safetensors", {f"rank{r}": t for r, t in enumerate(rng_states)})
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        write_json(tmp / "state.json", {"step": step, "scheduler": scheduler_state, **extra})

    atomic_folder(target, write)
    write_text(folder / LATEST, target.name + "\n")
    for old in sorted(p for p in folder.iterdir() if p.is_dir() and _STEP.fullmatch(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def clear_checkpoints(folder: Path) -> None:
    """Remove what :func:`save_checkpoint` wrote into ``folder`` (step-NNNNNN folders, ``latest``, their
    temporary names); anything else there stays, and so does the folder if anything is left."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if _OWN.fullmatch(path.name):
            remove(path)
    if not any(folder.iterdir()):
        folder.rmdir()


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none yet."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    target = folder / pointer.read_text().strip()
    if not (target / "state.json").is_file():
        raise CollmError(f"{pointer} names {target.name}, which is missing: delete {folder} to start over")
    return target


def load_checkpoint(path: Path, module, optimizer, scheduler, rank: int) -> dict:
    """Restore a checkpoint in place; returns its state.json (step and extras)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or set(weights) - set(params):
        raise CollmError(f"checkpoint {path} does not fit this model (e.g. {(missing or sorted(weights))[0]!r})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    with open(path / "optimizer.safetensors", "rb") as f:  # metadata lives in the header
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    optimizer.load_state_dict(_optimizer_state(opt_tensors, json.loads(header["__metadata__"]["meta"])))
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng = load_file(str(path / "rng.safetensors"))
    if f"rank{rank}" in rng:  # absent when resumed with more processes: those ranks start fresh streams
        torch.set_rng_state(rng[f"rank{rank}"])
    return state


def read_marker(path: Path, keys: set[str], command: str) -> dict | None:
    """The config a command saved as the marker of its run folder (``path``), None where there is none;
    CollmError for a file of that name the command did not write (it lacks one of ``keys``)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict) or not keys <= saved.keys():
        raise CollmError(f"{path} was not written by {command}: give another --out")
    return saved


def check_owned_folder(out: Path, marker: str, keys: set[str], command: str) -> None:
    """A command writes only into a new or empty folder, or a run folder it made itself (its ``marker`` file):
    a folder holding anything else is refused, so no one's files are trimmed or removed."""
    if out.exists() and not out.is_dir():
        raise CollmError(f"--out {out} is a file: give a folder")
    if not out.is_dir() or read_marker(out / marker, keys, command) is not None:
        return
    ours = set(temp_siblings(out / marker))  # a first start killed while writing its marker
    found = sorted(p.name for p in out.iterdir() if p not in ours)
    if found:
        raise CollmError(f"{out} holds files {command} did not write ({', '.join(found[:3])}"
                         f"{', ...' if len(found) > 3 else ''}): give a new or empty --out")
