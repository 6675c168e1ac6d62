"""One training run of one schedule. Knows nothing about Ray.

Read top to bottom: :meth:`Trainer.fit` loops over iterations; the sampler
decides the patch and batch size of each iteration from the schedule (that is
where the patch size changes); the LR follows one poly curve over the whole
run; every epoch ends with an atomic checkpoint, and every ``val_every``
epochs with a validation at the final patch size, whose metrics go to
``RUN_DIR/metrics.json`` and to the optional ``callback`` (the tuner's hook).
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from pgps_tune.augment import to_device
from pgps_tune.config import TrainConfig, augment_preset
from pgps_tune.data import PreparedDataset
from pgps_tune.errors import DivergedError, PgpsError, atomic_write, atomic_write_text
from pgps_tune.network import network_for
from pgps_tune.sampler import ProgressiveSampler, loader
from pgps_tune.schedule import Schedule

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
SCHEDULE = "schedule.yaml"
Callback = Callable[[dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PgpsError("--device cuda asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise PgpsError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def dice_scores(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Foreground Dice per class for one case (NaN where the class is absent from the label)."""
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    p = one_hot(pred[None, None].long(), num_classes)
    g = one_hot(label[None, None].long(), num_classes)
    return metric(p, g)[0].cpu().numpy()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class StageStats:
    iterations: int = 0
    wall_time_s: float = 0.0
    voxels: int = 0


@dataclass
class RunState:
    """What a checkpoint restores besides the torch objects."""

    iteration: int = 0
    train_time_s: float = 0.0
    stages: list[StageStats] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_dice: float = float("-inf")


class Trainer:
    def __init__(
        self,
        ds: PreparedDataset,
        train_cases: list[int],
        val_cases: list[int],
        schedule: Schedule,
        config: TrainConfig,
        out_dir: str | Path,
        callback: Callback | None = None,
    ) -> None:
        self.ds, self.train_cases, self.val_cases = ds, train_cases, val_cases
        self.schedule, self.cfg, self.out = schedule, config, Path(out_dir)
        self.callback = callback
        self.device = resolve_device(config.device)
        self.amp = self.device.type == "cuda"
        ipe = config.iterations_per_epoch
        if ipe < 1:
            raise PgpsError("--iterations-per-epoch must be >= 1")
        self.total_iterations = schedule.epochs * ipe
        self.val_every = config.val_every or max(1, schedule.epochs // 10)
        self.sampler = ProgressiveSampler(
            ds, train_cases, schedule, ipe, seed=config.seed,
            fg_ratio=config.fg_ratio, volumes_per_batch=config.volumes_per_batch, augment=config.augment,
        )
        torch.manual_seed(config.seed)
        self.model = network_for(config, ds.channels, ds.num_classes, schedule).to(self.device)
        lr = config.resolved_lr()
        # fused AdamW: one kernel per step instead of one per tensor, which matters on the tiny
        # first stages where per-iteration overhead would otherwise set the cost.  SGD stays
        # unfused: its fused kernel fails when some momentum buffers exist and others do not,
        # which is what a 1x1x1-bottleneck first stage leaves (those layers get no gradient).
        if config.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                self.model.parameters(), lr=lr, momentum=config.momentum,
                nesterov=True, weight_decay=config.weight_decay,
            )
        elif config.optimizer == "adamw":
            self.opt = torch.optim.AdamW(
                self.model.parameters(), lr=lr, weight_decay=config.weight_decay, fused=True
            )
        else:
            raise PgpsError(f"unknown optimizer {config.optimizer!r}; use sgd or adamw")
        total = self.total_iterations
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda it: (1 - min(it, total - 1) / total) ** 0.9
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self.state = RunState(stages=[StageStats() for _ in schedule.stages])

    # -- checkpoint ------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def _identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this trainer."""
        cfg = self.cfg.to_dict()
        for k in ("device", "threads", "workers", "max_train_seconds"):
            cfg.pop(k)  # free to change between runs
        return {
            "schedule": self.schedule.to_dict()["stages"], "final_patch": list(self.schedule.final_patch),
            "config": cfg, "dataset": self.ds.name, "train_cases": self.train_cases,
            "val_cases": self.val_cases,
        }

    def save_checkpoint(self) -> None:
        payload = {
            "identity": self._identity(),
            "schedule": self.schedule.to_dict(),
            "config": self.cfg.to_dict(),
            "num_classes": self.ds.num_classes,
            "channels": self.ds.channels,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "lr_scheduler": self.lr_sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
            "rng": _rng_state(),
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write(self.checkpoint_path, lambda fh: fh.write(buf.getbuffer()))

    def load_checkpoint(self) -> None:
        if not self.checkpoint_path.is_file():
            raise PgpsError(
                f"--resume given but {self.checkpoint_path} does not exist; run without --resume to start"
            )
        try:
            ck = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise PgpsError(f"checkpoint {self.checkpoint_path} is unreadable ({exc}); start a new run") from None
        if ck["identity"] != self._identity():
            raise PgpsError(
                f"{self.checkpoint_path} was made with another schedule, dataset or settings; "
                "resume with the same ones, or use a new --out"
            )
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.lr_sched.load_state_dict(ck["lr_scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        st = ck["state"]
        self.state = RunState(
            iteration=st["iteration"], train_time_s=st["train_time_s"],
            stages=[StageStats(**s) for s in st["stages"]], history=st["history"],
            best_val_dice=st["best_val_dice"],
        )
        _set_rng_state(ck["rng"])

    # -- training ----------------------------------------------------------------
    def _step(self, image: torch.Tensor, label: torch.Tensor) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.model(image)
            if out.dim() == 6:  # DynUNet deep supervision: [B, heads, C, ...]
                heads = torch.unbind(out, dim=1)
                weights = [0.5**i for i in range(len(heads))]
                loss = sum(w * self.loss_fn(h, label) for w, h in zip(weights, heads)) / sum(weights)
            else:
                loss = self.loss_fn(out, label)
        if not torch.isfinite(loss):
            raise DivergedError(
                f"diverged: the training loss is {float(loss)} at iteration {self.state.iteration}; "
                "lower --lr (or check the data for non-finite voxels) and start a new run"
            )
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 12.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.lr_sched.step()
        return float(loss.detach())

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train the whole schedule (or what is left of it); return the final metrics."""
        torch.set_num_threads(self.cfg.threads or len(os.sched_getaffinity(0)))
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
        self.schedule.save(self.out / SCHEDULE)
        ipe = self.cfg.iterations_per_epoch
        start = self.state.iteration
        losses: list[float] = []
        t_epoch = time.perf_counter()
        # on CUDA the loader leaves augmentation to the device: one batched resampling there
        for batch in loader(self.sampler, start, self.cfg.workers, defer_augment=self.device.type == "cuda"):
            it, k = batch["iteration"], batch["stage"]
            image, label = to_device(batch, self.device)
            losses.append(self._step(image, label))
            st = self.state.stages[k]
            st.iterations += 1
            st.voxels += int(label.numel())
            self.state.iteration = it + 1
            if self.state.iteration % ipe:
                continue
            # end of an epoch: account time, checkpoint, maybe validate
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_epoch
            st.wall_time_s += dt
            self.state.train_time_s += dt
            epoch = self.state.iteration // ipe
            done = epoch == self.schedule.epochs
            out_of_time = (
                self.cfg.max_train_seconds is not None
                and self.state.train_time_s >= self.cfg.max_train_seconds
            )
            if epoch % self.val_every == 0 or done or out_of_time:
                self._validate_and_report(epoch, k, float(np.mean(losses)))
                losses = []
            self.save_checkpoint()
            if out_of_time:
                break
            t_epoch = time.perf_counter()
        return self.metrics()

    # -- validation and reporting ------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        return evaluate(
            self.model, self.ds, self.val_cases, self.schedule.final_patch, self.device,
            self.cfg.sw_batch_size, self.cfg.sw_overlap,
        )

    def _validate_and_report(self, epoch: int, stage: int, train_loss: float) -> None:
        t = time.perf_counter()
        val = self.validate()
        val_time = time.perf_counter() - t
        self.state.best_val_dice = max(self.state.best_val_dice, val["dice"])
        record = {
            "epoch": epoch,
            "iteration": self.state.iteration,
            "stage": stage,
            "patch_size": list(self.schedule.stages[stage].patch_size),
            "train_loss": train_loss,
            "val_dice": val["dice"],
            "val_dice_per_class": val["dice_per_class"],
            "train_time_s": self.state.train_time_s,
            "val_time_s": val_time,
            "voxels_processed": self.voxels_processed,
            "baseline_equivalent_iterations": self.voxels_processed / self._baseline_voxels_per_iteration,
            "lr": self.opt.param_groups[0]["lr"],
            "completed": self.state.iteration == self.total_iterations,
        }
        self.state.history.append(record)
        self.save_checkpoint()  # the reported checkpoint holds this validation
        self.write_metrics()
        if self.callback is not None:
            self.callback({**record, "best_val_dice": self.state.best_val_dice, "checkpoint_dir": str(self.out)})

    @property
    def voxels_processed(self) -> int:
        return sum(s.voxels for s in self.state.stages)

    @property
    def _baseline_voxels_per_iteration(self) -> int:
        return self.schedule.baseline_batch_size * int(np.prod(self.schedule.final_patch))

    def metrics(self) -> dict[str, Any]:
        last = self.state.history[-1] if self.state.history else {}
        baseline = self._baseline_voxels_per_iteration * self.total_iterations
        return {
            "val_dice": last.get("val_dice", float("nan")),
            "val_dice_per_class": last.get("val_dice_per_class", {}),
            "best_val_dice": self.state.best_val_dice if self.state.history else float("nan"),
            "wall_time_s": self.state.train_time_s + sum(h["val_time_s"] for h in self.state.history),
            "train_time_s": self.state.train_time_s,
            "iterations": self.state.iteration,
            "total_iterations": self.total_iterations,
            "completed": self.state.iteration == self.total_iterations,
            "voxels_processed": self.voxels_processed,
            "voxel_fraction": self.voxels_processed / baseline,
            "stages": [
                {
                    "index": i, "patch_size": list(s.patch_size), "batch_size": s.batch_size,
                    "epochs": s.epochs, **asdict(self.state.stages[i]),
                }
                for i, s in enumerate(self.schedule.stages)
            ],
            "history": self.state.history,
            "schedule": self.schedule.to_dict(),
            "config": self.cfg.to_dict(),
            "augmentation": asdict(augment_preset(self.cfg.augment)),
            "dataset": self.ds.name,
            "device": str(self.device),
        }

    def write_metrics(self) -> None:
        atomic_write_text(self.out / METRICS, json.dumps(self.metrics(), indent=1) + "\n")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    ds: PreparedDataset,
    cases: list[int],
    final_patch: tuple[int, int, int],
    device: torch.device,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> dict[str, Any]:
    """Sliding-window inference at the final patch size; mean foreground Dice.

    ``dice_per_class`` averages each class over the cases that contain it;
    ``dice`` is the mean over classes.
    """
    model.eval()
    amp = device.type == "cuda"
    scores = []
    for i in cases:
        image = torch.from_numpy(np.array(ds.image(i)))[None].to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = sliding_window_inference(
                image, final_patch, sw_batch_size, model, overlap=overlap, mode="gaussian"
            )
        label = torch.from_numpy(np.array(ds.label(i))).to(device)
        scores.append(dice_scores(logits.argmax(1)[0], label, ds.num_classes))
    per_class = np.nanmean(np.array(scores), axis=0)
    names = [ds.labels[k] for k in range(1, ds.num_classes)]
    return {
        "dice": float(np.nanmean(per_class)),
        "dice_per_class": {n: float(v) for n, v in zip(names, per_class)},
        "cases": len(cases),
    }


def evaluate_run(run_dir: str | Path, ds: PreparedDataset, device: str = "auto") -> dict[str, Any]:
    """Evaluate the network of a run folder on every case of ``ds``."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise PgpsError(f"{path} does not exist; give a run folder written by 'pgps-tune train'")
    dev = resolve_device(device)
    try:
        ck = torch.load(path, map_location=dev, weights_only=False)
        cfg = ck["config"]
        schedule = Schedule.from_dict(ck["schedule"], source=str(path))
        num_classes, channels = ck["num_classes"], ck["channels"]
    except PgpsError:
        raise
    except Exception as exc:
        raise PgpsError(f"checkpoint {path} is unreadable ({type(exc).__name__}); retrain the run") from None
    if (num_classes, channels) != (ds.num_classes, ds.channels):
        raise PgpsError(
            f"the run was trained on {channels} channel(s) and {num_classes} classes, but {ds.name} has "
            f"{ds.channels} and {ds.num_classes}; evaluate on data of the same task"
        )
    model = network_for(TrainConfig.from_dict(cfg), channels, num_classes, schedule).to(dev)
    model.load_state_dict(ck["model"])
    return evaluate(
        model, ds, list(range(len(ds))), schedule.final_patch, dev, cfg["sw_batch_size"], cfg["sw_overlap"]
    )
