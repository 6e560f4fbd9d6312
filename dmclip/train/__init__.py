"""The training engine shared by pretrain, distill and capfilt.

    from dmclip.train import TrainConfig, TrainTask, fit
    summary = fit(task, dataset, TrainConfig(steps=100, batch_size=64), run, seed=0)

See :mod:`dmclip.train.loop` (the loop and one step), :mod:`dmclip.train.state` (what a checkpoint holds,
restore), :mod:`dmclip.train.rng` (per-micro-batch seeding), :mod:`dmclip.train.interrupt` (Ctrl-C / SIGTERM),
:mod:`dmclip.train.data` (seeded data order), :mod:`dmclip.train.schedule` (warmup + cosine) and
:mod:`dmclip.train.distributed` (torchrun).
"""

from dmclip.train.config import TrainConfig
from dmclip.train.data import DataOrder, DataPosition, epoch_permutation
from dmclip.train.loop import TrainTask, fit
from dmclip.train.schedule import WarmupCosine, lr_at
from dmclip.train.state import TrainState, default_param_groups

__all__ = ["TrainConfig", "TrainState", "TrainTask", "fit", "default_param_groups", "lr_at", "WarmupCosine", "DataOrder",
           "DataPosition", "epoch_permutation"]
