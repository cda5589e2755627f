"""Training: configuration, data (sampling, cache), resume (+ signals), distributed, and the fit loop.

One job per module: :mod:`~uadct.training.config` (the hyper-parameters),
:mod:`~uadct.training.data` (subjects -> memory-mapped volumes -> counter-seeded patch
batches), :mod:`~uadct.training.resume` (``<out>.resume.pt`` and SIGTERM/SIGINT),
:mod:`~uadct.training.distributed` (torchrun) and :mod:`~uadct.training.loop` (the fit
loop, early stopping, the checkpoint). The names most callers need are re-exported here.
"""

from uadct.training.config import AUGMENTATIONS, TrainConfig
from uadct.training.loop import TrainResult, evaluate_loss, train_model, write_history_csv
from uadct.training.resume import TrainingInterrupted, resume_path

__all__ = ["AUGMENTATIONS", "TrainConfig", "TrainResult", "TrainingInterrupted", "evaluate_loss", "resume_path",
           "train_model", "write_history_csv"]
