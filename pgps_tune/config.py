"""Trainer settings and their defaults: the one place that says how a run trains.

Pure Python (no torch, no Ray).  ``pgps-tune train``, the ``budget`` section of a
space file and every search trial build their :class:`TrainConfig` from the
defaults here, so a schedule scored in a sweep and the same schedule trained by
hand use the same optimizer, learning rate and epoch length unless a flag or a
file says otherwise.

Why these defaults: AdamW at 3e-3 (fused, one kernel per step) reached a plateau on
MSD Hippocampus within a few thousand iterations on 2 CPU cores, where SGD at the
paper's 1e-2 needs the paper's 250,000 iterations (docs/BENCHMARKS.md); 50
iterations per epoch keeps validations frequent at CPU budgets.  ``--optimizer
sgd`` with its own default learning rate gives the paper's recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

DEFAULT_EPOCHS = 50
DEFAULT_BATCH_SIZE = 2
OPTIMIZERS = ("adamw", "sgd")
DEFAULT_LR = {"adamw": 3e-3, "sgd": 1e-2}


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the data and the schedule. Plain data."""

    network: str = "unet"
    filters: tuple[int, ...] = (16, 32, 64, 128, 256, 320)
    deep_supervision: bool = False
    optimizer: str = "adamw"  # "adamw" (default) or "sgd" (the paper's)
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    weight_decay: float = 3e-5
    momentum: float = 0.99  # SGD (Nesterov)
    iterations_per_epoch: int = 50
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    workers: int = 0
    fg_ratio: float = 0.5
    volumes_per_batch: int | None = None
    val_every: int | None = None  # epochs; default: about 10 validations per run
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    max_train_seconds: float | None = None  # stop early (after an epoch) past this budget

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filters"] = list(self.filters)
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    @classmethod
    def for_trial(cls, budget: dict[str, Any], params: dict[str, Any], device: str, threads: int) -> TrainConfig:
        """A search trial's config: the space's budget, overridden by sampled trainer parameters."""
        return cls(
            network=budget["network"], filters=tuple(budget["filters"]), optimizer=budget["optimizer"],
            lr=params.get("lr", budget["lr"]), iterations_per_epoch=budget["iterations_per_epoch"],
            seed=budget["seed"], device=device, threads=threads, fg_ratio=params.get("fg_ratio", budget["fg_ratio"]),
            val_every=budget["val_every"],
        )
