"""``personamux generate``: answers of one persona at one or more bias scales."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..files import PRETRAIN_INFO_NAME, TEXT_PERSONAS_NAME, read_json
from ..persona_files import PERSONA_SUFFIX, PersonaFileError, persona_path
from ..prompting import DEFAULT_INSTRUCTION
from .common import Command, ModelArguments, codebook_dir, generate_texts, load_base, load_codebook


@dataclass
class GenerateArguments:
    persona: str = field(metadata={"help": "Persona name (in the codebook or --persona_dir) or a .safetensors file."})
    prompt: list[str] = field(metadata={"help": "One or more prompts (each answered separately)."})
    codebook: str | None = field(default=None, metadata={"help": "Codebook folder. Default: the shipped one."})
    persona_dir: str | None = field(
        default=None, metadata={"help": "Folder whose personas/ holds the persona (e.g. add-persona's --save_dir)."}
    )
    bias_scale: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={"help": "Bias scales to generate with: 1 full, 0.5 half, 0 none (paper: half is often best)."},
    )
    text_persona: str | None = field(default=None, metadata={"help": "Text description placed before the persona."})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction of the user turn."})
    max_new_tokens: int = field(default=60, metadata={"help": "Tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (top-k) instead of greedy decoding."})
    top_k: int = field(default=50, metadata={"help": "Top-k when sampling (paper: 50)."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Discourages loops in small models."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})


def generate(model_args: ModelArguments, args: GenerateArguments) -> int:
    """Generate answers of one persona at one or more bias scales."""
    import torch

    codebook = codebook_dir(args.codebook)
    base, tokenizer = load_base(model_args)
    model = load_codebook(base, codebook)
    target = args.persona
    if args.persona_dir and not target.endswith(PERSONA_SUFFIX):
        target = persona_path(args.persona_dir, target)
    try:
        name = model.load_persona(target)
    except KeyError as err:
        raise SystemExit(str(err).strip("'\"")) from None
    except PersonaFileError as err:  # fitted to another codebook, or not a persona file
        raise SystemExit(str(err)) from None
    text_persona = args.text_persona or read_json(codebook / TEXT_PERSONAS_NAME).get(name)
    info = read_json(codebook / PRETRAIN_INFO_NAME)
    for scale in args.bias_scale:
        torch.manual_seed(args.seed)
        answers = generate_texts(
            model,
            tokenizer,
            args.prompt,
            name,
            scale,
            text_persona,
            args.instruction,
            info.get("max_prompt_tokens"),
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
        )
        for prompt, answer in zip(args.prompt, answers):
            print(f"[{name} | bias {scale:g}] {prompt}\n  -> {answer}")
    return 0


COMMAND = Command("generate", generate, (ModelArguments, GenerateArguments))
