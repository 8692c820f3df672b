"""Causal language models read from a local Hugging Face folder, and their perplexity.

`arch` is ``hf:<local dir>``: a folder as written by ``save_pretrained`` (config.json, the weights,
the tokenizer's files), or a folder holding a GGUF file named by the model kwarg ``gguf_file``. The
model kwargs a spec may carry are exactly

- ``gguf_file``: a file inside the folder, read by transformers' GGUF reader and dequantized into a
  plain dense model (every weight an ordinary float tensor, so it can be pruned and retrained);
- ``dtype``: ``float32`` (the default), ``bfloat16`` or ``float16``.

Nothing is ever downloaded (``local_files_only=True``) and no code shipped with a model is ever run
(``trust_remote_code=False`` always; a spec that names ``trust_remote_code`` is refused). Every
failure is a `LMError`, a `workers.models.ModelError`, whose message names the folder or the kwarg.

Perplexity of a model on blocks of token ids x (n blocks of L tokens):

    loss = -(1 / (n (L - 1))) sum_i sum_{t=1}^{L-1} log p(x_{i,t} | x_{i,<t}),    perplexity = exp(loss),

the mean next-token cross-entropy over every predicted token (the first token of a block has no
context and is never predicted).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from workers.models import ModelError
from workers.config import HF_PREFIX, is_causal_lm  # noqa: F401  (torch-free: the driver and the API use them)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = "float32"
LM_KWARGS: tuple[str, ...] = ("gguf_file", "dtype")
FORBIDDEN_KWARGS: dict[str, str] = {
    "trust_remote_code": "Ladle never runs code shipped with a model (trust_remote_code is always False); use an "
                         "architecture transformers implements itself",
}
GGUF_MAGIC = b"GGUF"
# Where transformers' causal LMs keep their stack of transformer blocks (attribute paths, first match wins).
BLOCK_PATHS: tuple[str, ...] = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                                "model.language_model.layers", "transformer.blocks", "backbone.layers")
NUM_LAYER_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers")


class LMError(ModelError):
    """A causal language model that cannot be loaded as asked, or input it cannot score."""


def model_dir(arch: str) -> Path:
    """The folder ``hf:<dir>`` names (``~`` expanded), which must exist and be a directory."""
    if not is_causal_lm(arch):
        raise LMError(f"arch {arch!r} is not a causal language model; expected {HF_PREFIX}<local dir>")
    raw = arch.removeprefix(HF_PREFIX)
    if not raw.strip():
        raise LMError(f"arch {arch!r}: no folder after {HF_PREFIX!r}; expected {HF_PREFIX}<local dir>")
    folder = Path(raw).expanduser()
    if not folder.exists():
        raise LMError(f"arch {arch!r}: folder {str(folder)!r} does not exist (Ladle never downloads models; put a "
                      f"save_pretrained folder or a GGUF file there)")
    if not folder.is_dir():
        raise LMError(f"arch {arch!r}: {str(folder)!r} is not a folder ({HF_PREFIX}<dir> names the folder holding "
                      f"config.json and the weights, or the GGUF file)")
    return folder


def check_lm_kwargs(kwargs: Mapping[str, object]) -> dict:
    """The model kwargs of a spec, validated: only `LM_KWARGS` are accepted, ``trust_remote_code`` is refused
    by name. Returns {"gguf_file": str | None, "dtype": torch.dtype} (dtype defaults to float32)."""
    for name, why in FORBIDDEN_KWARGS.items():
        if name in kwargs:
            raise LMError(f"model kwarg {name!r} is not allowed: {why}")
    unknown = sorted(set(kwargs) - set(LM_KWARGS))
    if unknown:
        raise LMError(f"unknown model kwarg(s) {', '.join(map(repr, unknown))} for a causal LM; allowed: "
                      f"{', '.join(LM_KWARGS)}")
    dtype = kwargs.get("dtype", DEFAULT_DTYPE)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise LMError(f"model kwarg dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf_file = kwargs.get("gguf_file")
    if gguf_file is not None and (not isinstance(gguf_file, str) or not gguf_file.strip()):
        raise LMError(f"model kwarg gguf_file must be the name of a file inside the model folder, got {gguf_file!r}")
    return {"gguf_file": gguf_file, "dtype": DTYPES[dtype]}


def gguf_path(folder: Path, gguf_file: str) -> Path:
    """The GGUF file `gguf_file` names inside `folder` (a relative path that stays in the folder), checked to
    exist and to start with the GGUF magic bytes."""
    if Path(gguf_file).is_absolute():
        raise LMError(f"model kwarg gguf_file {gguf_file!r} must be a file name inside the model folder "
                      f"{str(folder)!r}, not an absolute path")
    root = folder.resolve()
    path = (root / gguf_file).resolve()
    if not path.is_relative_to(root):
        raise LMError(f"model kwarg gguf_file {gguf_file!r} points outside the model folder {str(folder)!r}")
    if not path.is_file():
        present = sorted(p.name for p in root.glob("*.gguf"))
        hint = f"; the folder holds {', '.join(present)}" if present else "; the folder holds no .gguf file"
        raise LMError(f"model kwarg gguf_file: {gguf_file!r} not found in {str(folder)!r}{hint}")
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise LMError(f"model kwarg gguf_file: {str(path)!r} is not a GGUF file (it starts with {magic!r}, not "
                      f"{GGUF_MAGIC!r})")
    return path


def check_causal_lm(arch: str, **kwargs) -> None:
    """Raise `LMError` unless `arch` and `kwargs` name a model `load_causal_lm` may try (cheap: the folder,
    the kwargs and the GGUF file's magic bytes are checked, nothing is parsed or loaded)."""
    opts = check_lm_kwargs(kwargs)
    folder = model_dir(arch)
    if opts["gguf_file"] is not None:
        gguf_path(folder, opts["gguf_file"])
    elif not (folder / "config.json").is_file():
        raise LMError(f"arch {arch!r}: {str(folder)!r} has no config.json (a save_pretrained folder is needed, or "
                      f"name a GGUF file in it with the model kwarg gguf_file)")


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                      "vocab.json"))


def load_causal_lm(arch: str, **kwargs) -> tuple[nn.Module, object]:
    """(model, tokenizer) for ``arch = "hf:<dir>"``, the model in eval mode on the CPU.

    Without ``gguf_file``: ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``.
    With ``gguf_file``: config and weights from that file, dequantized (``GgufConfig(dequantize=True)``) into a
    plain model; the tokenizer from the folder's own tokenizer files when it has them (tokenizer.json,
    tokenizer_config.json, tokenizer.model or vocab.json), else the one the GGUF file embeds.
    Always ``local_files_only=True`` and ``trust_remote_code=False``. A tokenizer without a pad token gets its
    eos token as pad token (none is added when it has no eos token either).
    """
    check_causal_lm(arch, **kwargs)
    opts, folder = check_lm_kwargs(kwargs), model_dir(arch)
    from transformers import AutoModelForCausalLM, GgufConfig

    common = {"local_files_only": True, "trust_remote_code": False}
    model_kwargs: dict = {"dtype": opts["dtype"], **common}
    tokenizer_kwargs: dict = dict(common)
    if opts["gguf_file"] is not None:
        path = str(gguf_path(folder, opts["gguf_file"]))       # absolute: never resolved against the cwd
        model_kwargs.update(gguf_file=path, quantization_config=GgufConfig(dequantize=True))
        if not _has_tokenizer_files(folder):
            tokenizer_kwargs["gguf_file"] = path
    what = f"{arch!r}" + (f" (gguf_file {opts['gguf_file']!r})" if opts["gguf_file"] else "")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **model_kwargs)
    except Exception as e:  # noqa: BLE001 - any failure while reading user files is a bad model folder
        raise LMError(_load_failure(what, "model", e)) from e
    tokenizer = _tokenizer(folder, tokenizer_kwargs, what)
    if opts["gguf_file"] is not None:
        _drop_gguf_quantizer(model)
    model.eval()
    return model, tokenizer


def _tokenizer(folder: Path, kwargs: dict, what: str):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise LMError(_load_failure(what, "tokenizer", e)) from e
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def causal_lm_skeleton(arch: str, **kwargs) -> tuple[nn.Module, object]:
    """(model, tokenizer) as `load_causal_lm` gives them, except that the model's parameters are on the meta
    device: built from its config alone (``accelerate.init_empty_weights``), no weight is read, dequantized
    or allocated. Its buffers (rotary frequencies) are real. A worker fills it with a checkpoint's state
    (`load_state_dict(state, assign=True)`), so that it holds one copy of the weights, never two."""
    check_causal_lm(arch, **kwargs)
    opts, folder = check_lm_kwargs(kwargs), model_dir(arch)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {"local_files_only": True, "trust_remote_code": False}
    config_kwargs, tokenizer_kwargs = dict(common), dict(common)
    if opts["gguf_file"] is not None:
        path = str(gguf_path(folder, opts["gguf_file"]))
        config_kwargs["gguf_file"] = path
        if not _has_tokenizer_files(folder):
            tokenizer_kwargs["gguf_file"] = path
    what = f"{arch!r}" + (f" (gguf_file {opts['gguf_file']!r})" if opts["gguf_file"] else "")
    try:
        config = AutoConfig.from_pretrained(str(folder), **config_kwargs)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=opts["dtype"], trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure while reading user files is a bad model folder
        raise LMError(_load_failure(what, "model", e)) from e
    return model.eval(), _tokenizer(folder, tokenizer_kwargs, what)


def _load_failure(what: str, part: str, error: Exception) -> str:
    """Why transformers could not load the model or tokenizer; a folder that needs its own code says so (rather
    than passing on transformers' advice to set trust_remote_code)."""
    if "trust_remote_code" in str(error):
        return (f"arch {what}: the {part} needs code shipped with it (an auto_map in its config), and Ladle never "
                f"runs such code (trust_remote_code is always False); use a model whose architecture transformers "
                f"implements itself")
    return f"arch {what}: cannot load the {part} ({type(error).__name__}: {error})"


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """Check that every weight of a GGUF model came out dense, and forget the GGUF loader (transformers mostly
    does so itself after dequantizing): the model then trains and saves like any other."""
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls.startswith("Gguf") or cls.startswith("GGUF"):
            raise LMError(f"GGUF model: module {name or '<root>'} ({cls}) kept packed weights despite dequantize=True")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:           # a read-only property in some transformers versions
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


# ---------------------------------------------------------------- scoring

def _check_blocks(blocks: Tensor) -> None:
    if not isinstance(blocks, Tensor) or blocks.dim() != 2 or blocks.dtype.is_floating_point or blocks.is_complex() \
            or blocks.dtype == torch.bool:
        raise LMError(f"blocks must be an (n, seq_len) tensor of integer token ids, got "
                      f"{type(blocks).__name__}{tuple(blocks.shape) if isinstance(blocks, Tensor) else ''}"
                      f"{f' of {blocks.dtype}' if isinstance(blocks, Tensor) else ''}")
    if blocks.shape[1] < 2:
        raise LMError(f"blocks of {blocks.shape[1]} token(s) leave nothing to predict; seq_len must be at least 2")


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Tensor, *, batch_size: int, device: torch.device | str | None = None) -> dict:
    """Next-token loss and perplexity of `model` on `blocks` (n, L) of token ids (model in eval mode, no grad;
    its training mode is restored afterwards).

    loss = mean over the n (L - 1) predicted tokens of -log p(x_t | x_<t) (float32 log-softmax),
    perplexity = exp(loss). Returns {"loss", "perplexity", "tokens": n (L - 1), "blocks": n, "seconds" (wall
    clock of the forward passes), "tokens_per_second": tokens / seconds}. No blocks: loss and perplexity nan.
    """
    _check_blocks(blocks)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LMError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.to(device)
    loss_sum, tokens = 0.0, 0
    start = time.perf_counter()
    try:
        for i in range(0, len(blocks), batch_size):
            x = blocks[i:i + batch_size].to(device=device, dtype=torch.long)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
            # the targets shifted, not the logits: no copy of the (batch x L x vocab) logits
            target = nn.functional.pad(x[:, 1:], (0, 1), value=-100)
            loss_sum += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                          target.reshape(-1), ignore_index=-100, reduction="sum"))
            del logits
            tokens += x.shape[0] * (x.shape[1] - 1)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens,
            "blocks": len(blocks), "seconds": seconds,
            "tokens_per_second": tokens / seconds if tokens and seconds > 0 else float("nan")}


# ---------------------------------------------------------------- description

def _attr_path(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the first of `BLOCK_PATHS` that is an `nn.ModuleList`, else the
    longest `nn.ModuleList` in the model (empty when it has none)."""
    for path in BLOCK_PATHS:
        found = _attr_path(model, path)
        if isinstance(found, nn.ModuleList):
            return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len, default=nn.ModuleList())


def describe(model: nn.Module) -> dict:
    """What a causal LM is: {"architecture": class name, "model_type", "parameters" (each shared tensor counted
    once), "blocks" (transformer blocks), "hidden_size", "vocab_size", "dtype"} (None where unknown)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config

    def setting(*keys: str) -> int | None:
        for key in keys:
            value = getattr(text, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None
    blocks = len(transformer_blocks(model)) or setting(*NUM_LAYER_KEYS)
    params = list(model.parameters())
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": int(sum(p.numel() for p in params)),
        "blocks": blocks,
        "hidden_size": setting("hidden_size", "n_embd", "d_model"),
        "vocab_size": setting("vocab_size"),
        "dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
    }
