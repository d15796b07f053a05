"""``personamux``: pretrain a codebook, add personas, generate, list personas, chat, serve, evaluate, and the demo.

One file per command (`main.COMMANDS`); every command but ``evaluate`` parses dataclasses with
`transformers.HfArgumentParser`, so ``personamux <command> --help`` shows each field's help text. Training commands
take all of `TrainingArguments` too (``--learning_rate``, ``--bf16``, ``--output_dir``, ...).
"""

from ..files import PRETRAIN_INFO_NAME, TEXT_PERSONAS_NAME
from .common import CodebookArguments, Command, ModelArguments, default_codebook_dir
from .main import COMMANDS, main

__all__ = [
    "COMMANDS",
    "PRETRAIN_INFO_NAME",
    "TEXT_PERSONAS_NAME",
    "CodebookArguments",
    "Command",
    "ModelArguments",
    "default_codebook_dir",
    "main",
]
