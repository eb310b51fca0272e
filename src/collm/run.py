"""The run folder: what ``CoLLM.save_pretrained`` and ``collm train`` write and ``CoLLM.from_pretrained`` loads.

    collm.json        base and expert specs, head shape, threshold, dtype, base_weights, how it was trained
    head.safetensors  the deferral head
    base_adapter/     the base's LoRA adapter (base_weights = lora), or base/ (full), or neither (original)
    manifest.json     sha256 and size of each file above (and of any model folder inside the run)

Every load checks the manifest first: one changed byte in a copied head once turned a 12.5% deferral rate
into 100% without a word. A file that differs, is missing, or was added to a folder the run loads from is a
one-line error naming it. A run without a manifest (made before manifests existed, or by hand) is refused
with the command that records its files as they are: ``collm seal DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path

from collm.atomic import write_json
from collm.backends.models import DTYPES
from collm.core.head import FEATURES
from collm.errors import CollmError
from collm.hashing import sha256_file

RUN_FORMAT = 1
RUN_CONFIG = "collm.json"
HEAD_FILE = "head.safetensors"
MANIFEST = "manifest.json"
BASE_WEIGHTS = ("original", "lora", "full")
_WEIGHT_FOLDERS = {"lora": "base_adapter", "full": "base"}
ASSETS = Path(__file__).parent / "assets"
SHIPPED = {"smollm2": ASSETS / "gsm", "qwen": ASSETS / "qwen"}
"""Runs shipped in the package, by name: a run folder argument may name one of them."""
DEFAULT_RUN = "smollm2"
"""The run that ``CoLLM.from_pretrained()`` and ``collm generate``/``serve`` load when no models are named."""


def resolve_run(run_dir: str | Path) -> Path:
    """A run folder, or a shipped run's name (SHIPPED) where no folder of that name exists."""
    path = Path(run_dir)
    if str(run_dir) in SHIPPED and not path.exists():
        return SHIPPED[str(run_dir)]
    return path


# ---------------------------------------------------------------- collm.json


def read_run_config(run_dir: str | Path, *, verify: bool = True) -> dict:
    """Read and check ``collm.json``; with ``verify`` (the default), first check every file against the
    run's manifest. Raises CollmError if the folder is not a run, a file differs from its recorded sha256,
    or the config is malformed."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG
    if not run_dir.exists():
        raise CollmError(f"run folder {str(run_dir)!r} does not exist: give a folder that collm train or "
                         f"save_pretrained wrote, or a shipped run ({', '.join(SHIPPED)})")
    if not run_dir.is_dir():
        raise CollmError(f"{run_dir} is a file, not a run folder: give the folder that holds {RUN_CONFIG}")
    if not path.is_file():
        raise CollmError(f"{run_dir} is not a collm run: {RUN_CONFIG} is missing")
    manifest = verify_manifest(run_dir) if verify else None
    config = check_config(read_json(path), path)
    if manifest is not None:
        _check_covered(run_dir, config, manifest)
    return config


def write_run_config(run_dir: str | Path, config: dict) -> None:
    """Write ``collm.json`` atomically (keys: base, experts, num_experts, hidden_size, threshold, dtype,
    base_weights = original | lora | full, training). Where the run has a manifest, its entry for
    collm.json is updated (and nothing else: a changed head stays detectable); :func:`seal` records all."""
    run_dir = Path(run_dir)
    write_json(run_dir / RUN_CONFIG, {"format": RUN_FORMAT, **config})
    try:
        manifest = read_json(run_dir / MANIFEST) if (run_dir / MANIFEST).is_file() else None
    except CollmError:
        manifest = None  # unreadable: loading will say so
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        manifest["files"][RUN_CONFIG] = _record(run_dir / RUN_CONFIG)
        manifest["total_bytes"] = sum(r.get("bytes", 0) for r in manifest["files"].values())
        write_json(run_dir / MANIFEST, manifest)


def check_config(config: object, path: Path) -> dict:
    """The parsed collm.json if every key has the type and range a load needs; CollmError naming the key."""
    if not isinstance(config, dict):
        raise CollmError(f"{path} must hold a JSON object")
    version = config.get("format", RUN_FORMAT)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CollmError(f"{path}: format must be a positive integer, got {_show(version)}")
    if version > RUN_FORMAT:
        raise CollmError(f"{path} has format {version}; this collm reads up to {RUN_FORMAT}: upgrade collm")
    missing = [k for k in ("base", "experts") if k not in config]
    if missing:
        raise CollmError(f"{path} lacks {', '.join(missing)}")
    if not isinstance(config["base"], str):
        raise CollmError(f"{path}: base must be a model spec (a string), got {_show(config['base'])}")
    experts = config["experts"]
    if not isinstance(experts, list) or not all(isinstance(e, str) for e in experts):
        raise CollmError(f"{path}: experts must be a list of model specs such as [\"expert\"], got {_show(experts)}")
    threshold = config.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise CollmError(f"{path}: threshold must be a number in [0, 1], got {_show(threshold)}")
    if config.get("dtype", "float32") not in DTYPES:
        raise CollmError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {_show(config.get('dtype'))}")
    if config.get("base_weights", "original") not in BASE_WEIGHTS:
        raise CollmError(f"{path}: base_weights must be one of {', '.join(BASE_WEIGHTS)}, "
                         f"got {_show(config.get('base_weights'))}")
    for key in ("num_experts", "hidden_size"):
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CollmError(f"{path}: {key} must be a positive integer, got {_show(value)}")
    features = config.get("head_features", [])
    if not isinstance(features, list) or any(f not in FEATURES for f in features):
        raise CollmError(f"{path}: head_features must be a list of {', '.join(FEATURES)}, got {_show(features)}")
    return config


def check_head(head, config: dict, run_dir: Path) -> None:
    """The loaded head has the shape collm.json records (a head file swapped for another run's is refused)."""
    for key in ("hidden_size", "num_experts"):
        if key in config and getattr(head, key) != config[key]:
            raise CollmError(f"{run_dir / HEAD_FILE} has {key} {getattr(head, key)} but {run_dir / RUN_CONFIG} "
                             f"says {config[key]}: the head belongs to another run")
    features = list(config.get("head_features", []))
    if list(head.features) != features:
        raise CollmError(f"{run_dir / HEAD_FILE} reads features {list(head.features)} but {run_dir / RUN_CONFIG} "
                         f"says head_features {features}: the head belongs to another run")


def spec_in(run_dir: Path, spec: str) -> str:
    """A spec saved as a path relative to the run folder resolves against it; names and absolute paths stay."""
    if spec.startswith(("http://", "https://")):  # an expert on a server: a URL, never a path
        return spec
    candidate = Path(run_dir) / spec
    return str(candidate) if not Path(spec).is_absolute() and candidate.exists() else spec


def read_json(path: Path):
    """Parsed JSON; CollmError naming the file when it is not UTF-8 JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise CollmError(f"{path} is not valid JSON ({reason}): restore it, or copy the run again") from None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- the manifest


def run_files(run_dir: str | Path, config: dict) -> list[Path]:
    """The files a load of this run reads: collm.json, the head, the base's adapter or weights, and any
    model folder (or file) inside the run that a spec names. Hidden files are left out."""
    run_dir = Path(run_dir)
    files = [p for p in (run_dir / RUN_CONFIG, run_dir / HEAD_FILE) if p.is_file()]
    places = []
    folder = _WEIGHT_FOLDERS.get(config.get("base_weights", "original"))
    if folder:
        places.append(run_dir / folder)
    root = run_dir.resolve()
    for spec in [config["base"], *config["experts"]]:
        path = Path(spec_in(run_dir, spec))
        if path.exists() and path.resolve().is_relative_to(root) and path.resolve() != root:
            places.append(path)
    for place in places:
        if place.is_file():
            files.append(place)
        elif place.is_dir():
            files += [p for p in sorted(place.rglob("*")) if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)]
    return sorted(set(files))


def _record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def seal(folder: str | Path, files: list[Path] | None = None) -> dict:
    """Record the sha256 and size of ``files`` (default: the run's :func:`run_files`) in manifest.json."""
    folder = Path(folder)
    if files is None:
        if not (folder / RUN_CONFIG).is_file():
            raise CollmError(f"{folder} is not a collm run: {RUN_CONFIG} is missing")
        files = run_files(folder, check_config(read_json(folder / RUN_CONFIG), folder / RUN_CONFIG))
    records = {p.relative_to(folder).as_posix(): _record(p) for p in sorted(files)}
    manifest = {"files": records, "total_bytes": sum(r["bytes"] for r in records.values())}
    write_json(folder / MANIFEST, manifest)
    return manifest


def verify_manifest(folder: str | Path, *, missing: str | None = None) -> dict:
    """Check every file the manifest lists is there with its size and sha256; returns the manifest.

    Raises CollmError naming the first file that is missing or differs, or the manifest itself when it is
    absent (``missing`` replaces the default message) or is not a collm manifest.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CollmError(missing or f"{folder} has no {MANIFEST} (the sha256 of its files), so they cannot be "
                                    f"checked: save the run again, or record its files as they are now with "
                                    f"`collm seal {folder}`")
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(r, dict) and isinstance(r.get("sha256"), str)
                                              for r in files.values()):
        raise CollmError(f"{path} is not a collm manifest (a \"files\" object of sha256 records): restore it, "
                         f"or copy the run again")
    root = folder.resolve()
    for name, record in files.items():
        file = folder / name
        if not file.resolve().is_relative_to(root):
            raise CollmError(f"{path} lists {name!r}, which is outside {folder}")
        if not file.is_file():
            raise CollmError(f"{file} is missing (listed in {path})")
        size = record.get("bytes")
        if (isinstance(size, int) and file.stat().st_size != size) or sha256_file(file) != record["sha256"]:
            raise CollmError(f"{file} does not match its recorded sha256 in {path} (changed or corrupt): "
                             f"restore it, or copy the run again")
    return manifest


def _check_covered(run_dir: Path, config: dict, manifest: dict) -> None:
    listed = set(manifest["files"])
    for file in run_files(run_dir, config):
        if file.relative_to(run_dir).as_posix() not in listed:
            raise CollmError(f"{file} is not in {run_dir / MANIFEST}: it was added after the run was saved; "
                             f"remove it, or record the run as it is now with `collm seal {run_dir}`")


def main(argv: list[str] | None = None) -> None:
    """``python -m collm.run seal DIR`` (the same as ``collm seal DIR``): record a run's files as they are."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "seal":
        raise SystemExit("usage: python -m collm.run seal RUN_DIR")
    try:
        manifest = seal(args[1])
    except CollmError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({"files": len(manifest["files"]), "total_bytes": manifest["total_bytes"]}))


if __name__ == "__main__":
    main()
