"""Training with `transformers.Trainer`: stage 1 pretrains the codebook, stage 2 fits the mixtures of new personas.

Stage 1 (`pretrain_codebook`, paper "Training"): every persona of the dataset gets a row of the mixture table, all at
zero. For ``warmup_epochs`` only the bias tokens train; then W, b and every mixture train jointly
(`StageSwitchCallback`). Stage 2 (`fit_personas`): W and b are frozen and only the mixture vectors of the new
personas train, from zero, full batch, 100 steps (paper, "Implementation details"). Both use Adam with
``eps=1e-4`` and no weight decay, and write persona files beside the adapter in every save.

Files: `arguments` (defaults that differ from `TrainingArguments`, in a table), `trainer`, `callbacks`, `stages`,
`heldout` (the held-out loss) and `plots`.
"""

from ..files import LOSS_CURVE_NAME, LOSS_LOG_NAME
from .arguments import CodebookTrainingArguments, PersonaFitArguments, PersonaMuxTrainingArguments
from .callbacks import LossLogCallback, StageSwitchCallback, TrainPersonasCallback
from .heldout import evaluate_loss
from .plots import STAGE_KEY, plot_loss_curve
from .stages import (
    build_codebook_trainer,
    build_fit_trainer,
    fit_personas,
    full_batch_arguments,
    personas_in,
    pretrain_codebook,
    split_identity_lines,
)
from .trainer import KEPT_COLUMNS, PersonaMuxTrainer, load_persona_files

__all__ = [
    "KEPT_COLUMNS",
    "LOSS_CURVE_NAME",
    "LOSS_LOG_NAME",
    "STAGE_KEY",
    "CodebookTrainingArguments",
    "LossLogCallback",
    "PersonaFitArguments",
    "PersonaMuxTrainer",
    "PersonaMuxTrainingArguments",
    "StageSwitchCallback",
    "TrainPersonasCallback",
    "build_codebook_trainer",
    "build_fit_trainer",
    "evaluate_loss",
    "fit_personas",
    "full_batch_arguments",
    "load_persona_files",
    "personas_in",
    "plot_loss_curve",
    "pretrain_codebook",
    "split_identity_lines",
]
