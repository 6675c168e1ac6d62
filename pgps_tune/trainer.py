"""One training run of one schedule. Knows nothing about Ray.

Read top to bottom: :meth:`Trainer.fit` loops over iterations; the sampler
decides the patch and batch size of each iteration from the schedule (that is
where the patch size changes); the LR follows one poly curve over the whole
run; every epoch ends with an atomic checkpoint, and every ``val_every``
epochs with a validation at the final patch size, whose metrics go to
``RUN_DIR/metrics.json`` and to the optional ``callback`` (the tuner's hook).

A run folder is read back later (``train --resume``, ``evaluate``), possibly after
it was copied from elsewhere, so its files must not be able to run code.
``checkpoint.pt`` is a ``torch.save`` archive holding only tensors and plain data
(dicts, lists, str, int, float, bool, None) and is read with
``torch.load(weights_only=True)``, which refuses any other Python object before it
is built.  Its fields (format version :data:`CHECKPOINT_FORMAT`):

- ``format_version``; ``identity`` (what must match to resume), ``schedule``,
  ``config``, ``num_classes``, ``channels``: plain data;
- ``model``, ``optimizer``, ``lr_scheduler``, ``scaler``: the torch state dicts;
- ``state``: :class:`RunState` as a dict (iteration, time, per-stage counts,
  validation history, best Dice);
- ``rng``: ``torch`` (a byte tensor), ``cuda`` (a list of them, on a GPU machine),
  ``numpy`` (``[name, key as a list of ints, pos, has_gauss, gauss]``) and
  ``python`` (``[version, internal state as a list of ints, gauss_next]``).

Every JSON file (``metrics.json``) is strict JSON: an undefined number (no
validation yet, a class absent from every case) is written as ``null``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from pgps_tune.augment import to_device
from pgps_tune.config import ADDED_LATER, TrainConfig, augment_preset
from pgps_tune.data import PreparedDataset
from pgps_tune.errors import DivergedError, PgpsError, atomic_write, os_cause, stop_signals_held, strict_json
from pgps_tune.network import cpu_bf16, memory_format, network_for, place
from pgps_tune.sampler import ProgressiveSampler, loader, prefetch
from pgps_tune.schedule import Schedule

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
METRICS = "metrics.json"
SCHEDULE = "schedule.yaml"
Callback = Callable[[dict[str, Any]], None]
# top-level fields of a checkpoint and their types, checked before anything is restored
_CHECKPOINT_FIELDS: dict[str, type] = {
    "format_version": int, "identity": dict, "schedule": dict, "config": dict, "num_classes": int,
    "channels": int, "model": dict, "optimizer": dict, "lr_scheduler": dict, "scaler": dict,
    "state": dict, "rng": dict,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PgpsError("--device cuda asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise PgpsError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def _memory_of(device: torch.device) -> tuple[int, str]:
    """(bytes, what) this machine gives a run on ``device``: GPU memory, or RAM within any cgroup limit
    (cgroup v1 or v2, the process's own or a parent's)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index or 0)
        return props.total_memory, f"GPU memory on {props.name}"
    from pgps_tune.imageio import memory_limit

    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(have, memory_limit() or have), "RAM"  # within a container's or a batch job's cgroup limit


def check_batch_memory(s: Schedule, cfg: TrainConfig, fix: str) -> None:
    """Refuse a schedule whose largest batch cannot fit this machine (estimate and memory in one line, then
    ``fix``): checked before a run starts, it says what an out-of-memory kill (of the process, or of a sweep's
    Ray workers) would not.

    Only the networks whose activations the schedule core models (by their ``filters``) are estimated;
    the others (segresnet, swinunetr, unetr, dynunet_resenc) have no such model yet and are not refused here.
    """
    from pgps_tune.schedule import SAVED_ACTIVATIONS, training_memory

    if cfg.network not in SAVED_ACTIVATIONS:
        return
    device = resolve_device(cfg.device)
    need, i = training_memory(s, cfg.filters, cfg.network, bytes_per_value=2 if device.type == "cuda" else 4,
                              res_units=cfg.res_units)
    have, what = _memory_of(device)
    if need > have:
        st = s.stages[i]
        raise PgpsError(
            f"stage {i} (batch {st.batch_size} of {'x'.join(map(str, st.patch_size))} patches) needs an estimated "
            f"{need / 2**30:.3g} GiB of memory for its activations, more than the {have / 2**30:.3g} GiB of {what} "
            f"here; {fix}"
        )


def dice_scores(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Foreground Dice per class for one case: ``2|P&G| / (|P|+|G|)``.

    NaN where the class is in neither the label nor the prediction (nothing to score);
    0 where the label lacks the class but the prediction has it (all false positives).
    """
    out = np.empty(num_classes - 1)
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        total = int(p.sum()) + int(g.sum())
        out[c - 1] = 2 * int((p & g).sum()) / total if total else math.nan
    return out


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Mean over the non-NaN entries; NaN (not a warning) where there are none."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=axis)
    total = np.where(defined, values, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), math.nan), where=count > 0)


def _number(x: Any) -> Any:
    """``json.dumps`` default: numpy scalars (from a sampler, a search space) as Python numbers."""
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not plain data")


def _plain(obj: Any) -> Any:
    """``obj`` as plain data (dicts, lists, str, int, float, bool, None): what weights_only loads back.

    numpy scalars become Python numbers and tuples become lists, so a value that came from a
    sampler or a YAML file cannot make a checkpoint that its own loader refuses.
    """
    return json.loads(json.dumps(obj, default=_number))


def _rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, key.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line (torch's messages span many)."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_checkpoint(path: Path, fix: str) -> dict[str, Any]:
    """Load a checkpoint without running code, and check its fields; on the CPU.

    ``fix`` ends every refusal (what the user should do). Raises :class:`PgpsError`
    with one line naming ``path`` for a file that holds anything but tensors and plain
    data (nothing in it is built or run), an unreadable file, or missing or mistyped fields.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": not the user's business
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or damaged files
        text = str(exc)
        if "Weights only load failed" in text:
            # a pickle asking for a Python object (which could run code), or bytes that are no pickle
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f"; it asks for the Python object {found.group(1)}" if found else ""
            raise PgpsError(
                f"refused to load {path}: it is not a checkpoint of tensors and plain data{what}; "
                f"nothing in it was run; {fix}"
            ) from None
        raise PgpsError(f"checkpoint {path} is unreadable or damaged ({_one_line(exc)}); {fix}") from None
    if not isinstance(ck, dict):
        raise PgpsError(f"{path} is not a pgps-tune checkpoint (it holds a {type(ck).__name__}); {fix}")
    bad = [k for k, t in _CHECKPOINT_FIELDS.items() if not isinstance(ck.get(k), t) or isinstance(ck[k], bool)]
    if bad:
        raise PgpsError(f"checkpoint {path} lacks or has wrongly typed fields: {', '.join(bad)}; {fix}")
    if ck["format_version"] != CHECKPOINT_FORMAT:
        raise PgpsError(
            f"checkpoint {path} has format {ck['format_version']}, this pgps-tune reads {CHECKPOINT_FORMAT}; {fix}"
        )
    return ck


def _typed(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it has type ``kind`` (a bool is no number here); else TypeError naming ``what``."""
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{what} is a {type(value).__name__}")
    return value


def _restore(path: Path, fix: str, steps: list[tuple[str, Callable[[], Any]]]) -> None:
    """Run each restore step; a field that does not fit becomes one line naming it and ``path``."""
    for name, step in steps:
        try:
            step()
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            raise PgpsError(f"checkpoint {path}: field {name!r} does not fit ({_one_line(exc)}); {fix}") from None


class _WorkerInit:
    """DataLoader worker start-up: leave Ctrl-C and SIGTERM to the main process, then the loader's init.

    A stop signal sent to the whole job (Ctrl-C in a terminal, a scheduler's SIGTERM) would
    otherwise end the workers while the main process may still wait for a batch from them;
    the main process stops at an iteration boundary and shuts its workers down itself.
    """

    def __init__(self, inner: Callable[[int], None] | None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


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
    best_val_dice: float = math.nan  # NaN until a validation gives a defined Dice
    # the training losses since the last validation (its train_loss is their mean): a run resumed between two
    # validations reports the same train_loss as one that never stopped
    pending_losses: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        """The state saved by ``asdict``, with every type checked (it comes from a file)."""
        history = _typed(d["history"], list, "history")
        for h in history:  # what is read back from old records
            _typed(_typed(h, dict, "history entry").get("val_time_s"), (int, float), "history val_time_s")
        return cls(
            iteration=_typed(d["iteration"], int, "iteration"),
            train_time_s=_typed(d["train_time_s"], (int, float), "train_time_s"),
            stages=[
                StageStats(_typed(s["iterations"], int, "stage iterations"),
                           _typed(s["wall_time_s"], (int, float), "stage wall_time_s"),
                           _typed(s["voxels"], int, "stage voxels"))
                for s in _typed(d["stages"], list, "stages")
            ],
            history=history,
            best_val_dice=_typed(d["best_val_dice"], (int, float), "best_val_dice"),
            pending_losses=[float(_typed(x, (int, float), "pending loss"))  # absent before it was kept: none
                            for x in _typed(d.get("pending_losses", []), list, "pending_losses")],
        )


@contextlib.contextmanager
def _onednn(enabled: bool) -> Iterator[None]:
    """oneDNN (mkldnn) convolutions on or off inside the block; the setting before is restored after."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@functools.cache  # asked at every CPU step; the hardware does not change within a process
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where autocast to it pays.

    Elsewhere PyTorch emulates bf16 and a step gets slower, so ``cpu_precision: bf16`` trains in fp32 there.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPU-feature checks
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _check_cases(ds: PreparedDataset, train_cases: Sequence[int], val_cases: Sequence[int]) -> None:
    """Refuse case indices that are not indices of ``ds`` (they failed at the first batch or validation, or a
    negative one picked a case from the end without a word)."""
    for what, cases in (("train_cases", train_cases), ("val_cases", val_cases)):
        bad = next((c for c in cases if isinstance(c, bool) or not isinstance(c, int | np.integer)
                    or not 0 <= c < len(ds)), None)
        if bad is not None:
            raise PgpsError(f"{what} holds {bad!r}, which is not a case index of {ds.name} (0 to {len(ds) - 1}); "
                            "give indices into the dataset's cases (data.split or data.fold_split make them)")


class Trainer:
    # batches cut ahead of the step by a background thread (CPU, no loader workers); 0: none.
    # Off: on 2 cores with 2 torch threads the thread's augmentation competed with the step and
    # made iterations slower (docs/bench_iteration.md); set it where spare cores exist.
    prefetch_depth = 0
    # On the CPU a oneDNN convolution carries a fixed cost per call (0.1-0.25 ms here) that sets the
    # price of the tiniest stages; PyTorch's own convolutions (im2col + GEMM) cost less there and more
    # everywhere else.  Steps of at most this many voxels (batch x patch) use PyTorch's: at 8x8x8 with
    # batch 2 the step costs about 30% less; from 16x16x8 on oneDNN is faster (docs/bench_iteration.md).
    # The choice is a function of the batch's shape alone, so a resumed run makes the same one.  0: oneDNN
    # always.
    native_conv_max_voxels = 2048

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
        if not isinstance(schedule, Schedule):
            raise PgpsError(f"schedule must be a Schedule, got a {type(schedule).__name__}; build one with "
                            "pgps_tune.schedule (load, preset, parametric or Schedule.from_dict)")
        config.check()  # every setting in range before anything is built (the optimizer before its default lr)
        _check_cases(ds, train_cases, val_cases)
        self.ds, self.train_cases, self.val_cases = ds, train_cases, val_cases
        self.schedule, self.cfg, self.out = schedule, config, Path(out_dir)
        self.callback = callback
        self.on_epoch: Callback | None = None  # optional per-epoch hook (a progress bar): sees every epoch's end
        self.device = resolve_device(config.device)
        self.amp = self.device.type == "cuda"
        ipe = config.iterations_per_epoch  # >= 1, as every setting, checked by config.check() above
        self.total_iterations = schedule.epochs * ipe
        self.val_every = config.val_every or max(1, schedule.epochs // 10)
        self.sampler = ProgressiveSampler(
            ds, train_cases, schedule, ipe, seed=config.seed,
            fg_ratio=config.fg_ratio, volumes_per_batch=config.volumes_per_batch, augment=config.augment,
        )
        torch.manual_seed(config.seed)
        self.model = place(network_for(config, ds.channels, ds.num_classes, schedule), config.network, self.device,
                           schedule.final_patch)
        self._layout = memory_format(config.network, self.device, schedule.final_patch)
        lr = float(config.resolved_lr())  # a numpy float would pickle as an object weights_only refuses
        # fused optimizers: one kernel per step instead of one per tensor, which matters on the tiny
        # first stages where per-iteration overhead would otherwise set the cost
        try:
            if config.optimizer == "sgd":
                self.opt: torch.optim.Optimizer = torch.optim.SGD(
                    self.model.parameters(), lr=lr, momentum=float(config.momentum),
                    nesterov=True, weight_decay=float(config.weight_decay), fused=True,
                )
            else:
                self.opt = torch.optim.AdamW(
                    self.model.parameters(), lr=lr, weight_decay=float(config.weight_decay), fused=True
                )
        except ValueError as exc:  # torch's own range checks (AdamW refuses a NaN learning rate)
            raise PgpsError(f"{config.optimizer} refuses its settings ({exc}); give --lr and the others "
                            "as finite, non-negative numbers") from None
        self._fill_momentum()
        total = self.total_iterations
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda it: (1 - min(it, total - 1) / total) ** 0.9
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self.state = RunState(stages=[StageStats() for _ in schedule.stages])
        self.saved_iteration: int | None = None  # iteration of the checkpoint on disk, once there is one
        self.written: set[Path] = set()  # files of the run folder this trainer wrote
        self.replaced: dict[Path, bytes] = {}  # what such a file held before this trainer first wrote it
        # set from a signal handler: fit() raises KeyboardInterrupt at the next iteration boundary
        self.stop_requested = False

    def _fill_momentum(self) -> None:
        """Give every SGD parameter a zero momentum buffer that lacks one.

        Fused SGD fails on a mix of parameters with and without a buffer, which is what a
        1x1x1-bottleneck first stage leaves (its deepest layers get no gradient) and what a
        checkpoint of such a stage holds.  With dampening 0 a zero buffer is the same as torch's
        lazy one: the first step sets it to ``0 * momentum + grad``, what the lazy path copies.
        """
        if not isinstance(self.opt, torch.optim.SGD):
            return
        for group in self.opt.param_groups:
            for p in group["params"]:
                state = self.opt.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _lay_out(self, patch: Sequence[int]) -> None:
        """Put the network in the memory layout it computes fastest in for ``patch`` (a function of the
        patch alone, so a resumed run makes the same choice), its optimizer buffers along with it."""
        layout = memory_format(self.cfg.network, self.device, patch)
        if layout != self._layout:
            self.model.to(memory_format=layout)
            self._align_state()
            self._layout = layout

    def _align_state(self) -> None:
        """Give every optimizer buffer its parameter's memory layout.

        A fused optimizer walks a parameter and its buffers as flat memory, so a buffer in another
        layout (a checkpoint written in the default layout, loaded into a channels-last network)
        would be updated against the wrong elements without any error.  Copying it into a tensor
        laid out like its parameter keeps the values and fixes the order.
        """
        for p, state in self.opt.state.items():
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    # -- checkpoint ------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def _identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this trainer (as plain data)."""
        cfg = self.cfg.to_dict()
        for k in ("device", "threads", "workers", "max_train_seconds"):
            cfg.pop(k)  # free to change between runs
        for k, before in ADDED_LATER.items():  # a checkpoint from before the setting existed trained with this
            if cfg[k] == before:
                cfg.pop(k)
        return _plain({
            "schedule": self.schedule.to_dict()["stages"], "final_patch": list(self.schedule.final_patch),
            **({"sampling": self.schedule.sampling} if self.schedule.sampling != "staged" else {}),
            "config": cfg, "dataset": self.ds.name, "train_cases": self.train_cases,
            "val_cases": self.val_cases, "data_sample": self._data_sample,
        })

    @functools.cached_property
    def _data_sample(self) -> str:
        """:func:`data_sample` of the run's cases: computed once, not at every checkpoint."""
        return data_sample(self.ds, [*self.train_cases, *self.val_cases])

    def _data_record(self) -> dict[str, Any]:
        """How the run's data was preprocessed and split: what predict and evaluate need (plain data)."""
        ds = self.ds
        return {
            "preprocessing": {
                "spacing": list(ds.spacing), "channels": ds.channels,
                "labels": {str(k): v for k, v in ds.labels.items()}, "normalisation": ds.normalisation,
            },
            "split": {"train": [ds.case_ids[i] for i in self.train_cases],
                      "val": [ds.case_ids[i] for i in self.val_cases]},
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically: a failed write (a full disk) leaves the previous one intact."""
        payload = {
            "format_version": CHECKPOINT_FORMAT,
            "identity": self._identity(),
            **_plain(self._data_record()),
            "schedule": _plain(self.schedule.to_dict()),
            "config": _plain(self.cfg.to_dict()),
            "num_classes": self.ds.num_classes,
            "channels": self.ds.channels,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "lr_scheduler": self.lr_sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": _plain(asdict(self.state)),
            "rng": _rng_state(),
            "runtime": self._runtime(),
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        with stop_signals_held():  # a checkpoint on disk is one the run counts as saved (what a stop reports)
            self._write(self.checkpoint_path, lambda fh: fh.write(buf.getbuffer()))
            self.saved_iteration = self.state.iteration

    def _write(self, path: Path, write: Callable[[Any], Any]) -> None:
        """An atomic write of a run file whose OS failure (ENOSPC, EIO, ...) is one line, not a traceback."""
        try:
            with stop_signals_held():  # a file written is one a stop before the first checkpoint removes
                if path not in self.written and path.is_file():  # a file the user put there (a --schedule file)
                    self.replaced[path] = path.read_bytes()
                atomic_write(path, write)
                self.written.add(path)
        except (OSError, PgpsError) as err:
            exc = os_cause(err)
            if exc is None:
                raise
            kept = (
                f"the checkpoint of iteration {self.saved_iteration} is intact: free space, then rerun with --resume"
                if self.saved_iteration is not None else "no checkpoint was written yet: free space, then rerun"
            )
            raise PgpsError(f"cannot write {path} ({exc.strerror or exc}); {kept}") from None

    def _runtime(self) -> dict[str, Any]:
        """What a run may change between its parts but what decides the rounding of every float
        reduction: a run resumed under another runtime continues correctly, not bit-identically."""
        cpu = self.device.type == "cpu"
        return {"device": self.device.type, "torch": str(torch.__version__),
                **({"threads": torch.get_num_threads(), "cpu_bf16": cpu_has_bf16()} if cpu else {})}

    def load_checkpoint(self) -> None:
        """Restore everything from the run folder's checkpoint, refusing one made for another run."""
        path = self.checkpoint_path
        if not path.is_file():
            raise PgpsError(f"--resume given but {path} does not exist; run without --resume to start")
        fix = "start a new run without --resume in a new --out"
        ck = read_checkpoint(path, fix)
        theirs, mine = dict(ck["identity"]), self._identity()
        if "data_sample" not in theirs:  # a checkpoint from before the identity held the data's voxels
            mine.pop("data_sample")
        if theirs != mine:
            raise PgpsError(f"{path} was made with {identity_difference(theirs, mine)}; resume with the same ones, "
                            "or use a new --out")

        def state() -> None:
            st = RunState.from_dict(ck["state"])
            if len(st.stages) != len(self.schedule.stages) or st.iteration > self.total_iterations:
                raise ValueError("its stages or iteration do not match the schedule")
            self.state = st

        _restore(path, fix, [
            ("model", lambda: self.model.load_state_dict(ck["model"])),
            ("optimizer", lambda: self._load_optimizer(ck["optimizer"])),
            ("lr_scheduler", lambda: self.lr_sched.load_state_dict(ck["lr_scheduler"])),
            # a run started on the CPU (no loss scaling, an empty state) continues on a GPU from a fresh scaler
            ("scaler", lambda: self.scaler.load_state_dict(ck["scaler"]) if ck["scaler"] else None),
            ("state", state),
            ("rng", lambda: _set_rng_state(ck["rng"])),
        ])
        self.saved_iteration = self.state.iteration
        self._note_runtime(ck.get("runtime"))

    def _note_runtime(self, theirs: Any) -> None:
        """Say (one line) when the run resumes under another device, thread count, torch or CPU kind than
        its checkpoint was written under: resume is bit-exact only under the same ones."""
        mine = self._runtime()
        if not isinstance(theirs, dict) or theirs == mine:
            return  # a checkpoint from before runtimes were recorded: nothing to compare
        names = {"threads": "torch threads", "cpu_bf16": "bfloat16 hardware", "device": "device", "torch": "torch"}
        diff = [f"{names.get(k, k)} {theirs.get(k, 'none')} (now {mine.get(k, 'none')})"
                for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]
        print(f"pgps-tune: note: the checkpoint was written with {', '.join(diff)}: the run continues correctly "
              "but not bit-identically to an uninterrupted one (float rounding differs); resume with the same "
              "ones for an exact continuation", file=sys.stderr, flush=True)

    def _load_optimizer(self, sd: dict[str, Any]) -> None:
        """Load an optimizer state, checking what torch does not: every buffer has its parameter's shape."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        for index, buffers in sd["state"].items():
            for name, value in buffers.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"state {index}.{name} is a {type(value).__name__}, not a tensor")
                if value.dim() and value.shape != params[index].shape:
                    raise ValueError(f"state {index}.{name} has shape {list(value.shape)}, "
                                     f"its parameter {list(params[index].shape)}")
        self.opt.load_state_dict(sd)
        self._align_state()
        self._fill_momentum()  # a checkpoint from before buffers were made up front

    # -- training ----------------------------------------------------------------
    def _diverged(self, what: str, value: torch.Tensor) -> DivergedError:
        return DivergedError(
            f"diverged: the {what} is {float(value.detach())} at iteration {self.state.iteration}; lower --lr "
            "(or check the data for non-finite voxels) and start a new run in a new --out"
        )

    def _step(self, image: torch.Tensor, label: torch.Tensor) -> float:
        """One optimisation step; a non-finite loss (or, without AMP, gradient) stops the run."""
        native = self.device.type == "cpu" and label.numel() <= self.native_conv_max_voxels
        self._lay_out(label.shape[2:])
        with _onednn(not native):
            return self._step_with(image, label)

    def autocast_dtype(self, patch: Sequence[int], batch: int) -> torch.dtype | None:
        """The reduced precision a training step of ``batch`` patches of ``patch`` computes its forward
        pass in (None: fp32): fp16 AMP on CUDA; on the CPU bfloat16 with ``cpu_precision`` "bf16" where
        the CPU has it in hardware and :func:`pgps_tune.network.cpu_bf16` says it pays.  The loss, the
        fp32 parameters' gradients and the optimizer stay fp32.  A function of the batch's shape (and
        the machine), so a resumed run makes the same choice."""
        if self.amp:
            return torch.float16
        if (self.device.type == "cpu" and self.cfg.cpu_precision == "bf16"
                and cpu_bf16(self.cfg.network, patch, batch) and cpu_has_bf16()):
            return torch.bfloat16
        return None

    def arithmetic(self, stage: int) -> str:
        """What stage ``stage``'s training steps compute in ("fp32", "bf16" or "fp16"), for metrics.json."""
        s = self.schedule.stages[stage]
        dtype = self.autocast_dtype(s.patch_size, s.batch_size)
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def _step_with(self, image: torch.Tensor, label: torch.Tensor) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        dtype = self.autocast_dtype(label.shape[2:], label.shape[0])
        with torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            out = self.model(image)
        out = out.float()  # the loss in fp32 whatever the forward pass computed in
        if out.dim() == 6:  # DynUNet deep supervision: [B, heads, C, ...]
            heads = torch.unbind(out, dim=1)
            weights = [0.5**i for i in range(len(heads))]
            loss = sum(w * self.loss_fn(h, label) for w, h in zip(weights, heads)) / sum(weights)
        else:
            loss = self.loss_fn(out, label)
        if not torch.isfinite(loss):
            raise self._diverged("training loss", loss)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 12.0, foreach=True)
        # with AMP an overflowing fp16 gradient is routine: the scaler skips that step and lowers
        # its scale; in full precision a non-finite gradient means the run has diverged
        if not self.amp and not torch.isfinite(norm):
            raise self._diverged("gradient norm", norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.lr_sched.step()
        return float(loss.detach())

    def _batches(self, start: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(iteration, stage, image, label) on the device from iteration ``start``, made ahead of the step.

        With ``prefetch_depth`` and no loader workers a background thread cuts and augments the
        next batches while the step runs (:func:`pgps_tune.sampler.prefetch`); workers already run ahead.  On
        CUDA the loader leaves augmentation to the device: one batched resampling there.
        """
        cuda = self.device.type == "cuda"
        batches = loader(self.sampler, start, self.cfg.workers, defer_augment=cuda)
        batches.worker_init_fn = _WorkerInit(batches.worker_init_fn)

        def ready(batch: dict[str, Any]) -> tuple[int, int, torch.Tensor, torch.Tensor]:
            image, label = to_device(batch, self.device)
            return batch["iteration"], batch["stage"], image, label

        items = map(ready, batches)
        if self.prefetch_depth and not self.cfg.workers and not cuda:
            return prefetch(items, self.prefetch_depth)
        return (item for item in items)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train the whole schedule (or what is left of it); return the final metrics."""
        torch.set_num_threads(self.cfg.threads or len(os.sched_getaffinity(0)))
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
        self._write(self.out / SCHEDULE, lambda fh: fh.write(self.schedule.to_yaml().encode("utf-8")))
        ipe = self.cfg.iterations_per_epoch
        start = self.state.iteration
        losses = self.state.pending_losses  # since the last validation (kept in checkpoints)
        epoch_voxels = [0] * len(self.schedule.stages)  # random sampling mixes stages within an epoch
        t_epoch = time.perf_counter()
        with contextlib.closing(self._batches(start)) as batches:
            for it, k, image, label in batches:
                if self.stop_requested:  # here no batch is half-received from a worker
                    raise KeyboardInterrupt
                losses.append(self._step(image, label))
                st = self.state.stages[k]
                st.iterations += 1
                st.voxels += int(label.numel())
                epoch_voxels[k] += int(label.numel())
                self.state.iteration = it + 1
                if self.state.iteration % ipe:
                    continue
                # end of an epoch: account time, maybe validate, checkpoint
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t_epoch
                for i, v in enumerate(epoch_voxels):  # an epoch's time goes to its stages by their voxels
                    self.state.stages[i].wall_time_s += dt * (v / sum(epoch_voxels))
                epoch_voxels = [0] * len(self.schedule.stages)
                self.state.train_time_s += dt
                epoch = self.state.iteration // ipe
                done = epoch == self.schedule.epochs
                out_of_time = (
                    self.cfg.max_train_seconds is not None
                    and self.state.train_time_s >= self.cfg.max_train_seconds
                )
                if self.on_epoch is not None:
                    self.on_epoch({"epoch": epoch, "epochs": self.schedule.epochs, "stage": k,
                                   "stages": len(self.schedule.stages),
                                   "patch_size": list(self.schedule.stages[k].patch_size),
                                   "train_loss": float(np.mean(losses[-ipe:])),
                                   "train_time_s": self.state.train_time_s})
                if epoch % self.val_every == 0 or done or out_of_time:
                    train_loss = float(np.mean(losses))
                    self.state.pending_losses = losses = []  # before the checkpoint the report saves
                    self._validate_and_report(epoch, k, train_loss)
                else:
                    self.save_checkpoint()
                if out_of_time:
                    break
                t_epoch = time.perf_counter()
        return self.metrics()

    # -- validation and reporting ------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        self._lay_out(self.schedule.final_patch)  # as evaluate and predict place it
        return evaluate(
            self.model, self.ds, self.val_cases, self.schedule.final_patch, self.device,
            self.cfg.sw_batch_size, self.cfg.sw_overlap,
        )

    def _validate_and_report(self, epoch: int, stage: int, train_loss: float) -> None:
        t = time.perf_counter()
        val = self.validate()
        val_time = time.perf_counter() - t
        if math.isfinite(val["dice"]) and not self.state.best_val_dice >= val["dice"]:  # NaN: none yet
            self.state.best_val_dice = val["dice"]
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
        """The run's summary; undefined numbers are NaN here and ``null`` in ``metrics.json``."""
        last = self.state.history[-1] if self.state.history else {}
        baseline = self._baseline_voxels_per_iteration * self.total_iterations
        return {
            "val_dice": last.get("val_dice", math.nan),
            "val_dice_per_class": last.get("val_dice_per_class", {}),
            "best_val_dice": self.state.best_val_dice,
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
                    "epochs": s.epochs, "arithmetic": self.arithmetic(i), **asdict(self.state.stages[i]),
                }
                for i, s in enumerate(self.schedule.stages)
            ],
            "history": self.state.history,
            "schedule": self.schedule.to_dict(),
            "config": self.cfg.to_dict(),
            "augmentation": asdict(augment_preset(self.cfg.augment)),
            "dataset": self.ds.name,
            "device": str(self.device),
            **self._data_record(),
        }

    def write_metrics(self) -> None:
        text = strict_json(self.metrics()) + "\n"
        self._write(self.out / METRICS, lambda fh: fh.write(text.encode("utf-8")))


class TensorBoardLog:
    """A trainer callback writing each validation to TensorBoard event files in ``log_dir``.

    Scalars per validation, stepped by epoch: ``train/loss``, ``val/dice``, ``val/best_dice``,
    ``val/dice_<class>``, ``schedule/stage``, ``schedule/patch_x|y|z`` (the patch sides), ``lr``
    and ``compute/baseline_iterations``.  The writer starts at the first record, so a run that
    stops before its first validation leaves no event file.  Sweeps need no such hook: Ray writes
    the same metrics of every trial to events files in the trial folders.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def __call__(self, r: dict[str, Any]) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))
        step = int(r["epoch"])
        scalars = {"train/loss": r["train_loss"], "val/dice": r["val_dice"], "val/best_dice": r["best_val_dice"],
                   "schedule/stage": r["stage"], "lr": r["lr"],
                   "compute/baseline_iterations": r["baseline_equivalent_iterations"],
                   **{f"schedule/patch_{axis}": side for axis, side in zip("xyz", r["patch_size"])},
                   **{f"val/dice_{name}": v for name, v in r["val_dice_per_class"].items()}}
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def data_sample(ds: PreparedDataset, cases: Sequence[int], per_case: int = 64) -> str:
    """A short fingerprint of the voxels of ``cases``: their shapes and ``per_case`` image and label voxels
    at fixed places.  It tells a run's data from another folder with the same name and case names (a resume
    on other images), reading a few pages of each memory-mapped case, not the dataset."""
    h = hashlib.sha256()
    for i in cases:
        image, label = ds.image(i), ds.label(i)
        places = np.linspace(0, label.size - 1, num=min(per_case, label.size)).astype(np.int64)
        h.update(repr((list(image.shape), ds.case_ids[i])).encode())
        h.update(np.ascontiguousarray(image.reshape(image.shape[0], -1)[:, places]).tobytes())
        h.update(np.ascontiguousarray(label.reshape(-1)[places]).tobytes())
    return h.hexdigest()[:16]


def identity_difference(theirs: dict[str, Any], mine: dict[str, Any]) -> str:
    """What differs between a checkpoint's identity and this run's, for the refusal (values as the
    checkpoint has them, then as given now)."""
    def short(v: Any) -> str:
        text = json.dumps(v) if not isinstance(v, str) else v
        return text if len(text) <= 40 else text[:37] + "..."

    parts = []
    for key in sorted(set(theirs) | set(mine)):
        missing = "staged" if key == "sampling" else None  # a staged schedule's identity leaves sampling out
        a, b = theirs.get(key, missing), mine.get(key, missing)
        if a == b:
            continue
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            a, b = {**ADDED_LATER, **a}, {**ADDED_LATER, **b}  # a setting left out of an identity has its old value
            parts += [f"{k} {short(a.get(k))} (now {short(b.get(k))})" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k)]
        elif key == "data_sample":
            parts.append("other images or labels under the same case names (another copy or version of the data)")
        elif key in ("schedule", "final_patch", "sampling"):
            parts.append("another schedule" if key == "schedule" else f"{key} {short(a)} (now {short(b)})")
        elif key in ("train_cases", "val_cases"):
            parts.append(f"another split ({key.replace('_', ' ')})")
        else:
            parts.append(f"{key} {short(a)} (now {short(b)})")
    return ", ".join(dict.fromkeys(parts)) or "another schedule, dataset or settings"


def discard_unstarted_run(trainer: Trainer | None) -> None:
    """Undo a run that stopped before its first checkpoint, so that rerunning the command works.

    Removes the files ``trainer`` wrote (a file that was there before, such as the --schedule file
    itself, gets its old content back).  A run that has a checkpoint is left alone.  The run folder,
    if the command made it and it is then empty, is the CLI's to remove (``_no_empty_folder_left``).
    """
    if trainer is None or trainer.saved_iteration is not None:
        return
    for path in trainer.written:
        if path in trainer.replaced:
            old = trainer.replaced[path]
            atomic_write(path, lambda fh, old=old: fh.write(old))
        else:
            path.unlink(missing_ok=True)


@torch.no_grad()
def window_probs(
    model: torch.nn.Module,
    image: torch.Tensor,
    final_patch: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    mirror: bool = False,
) -> torch.Tensor:
    """Class probabilities ``[1, K, ...]`` of an image ``[1, C, ...]``: Gaussian-weighted sliding window
    at the final patch; with ``mirror``, the mean over the image flipped along every subset of its
    three axes (test-time augmentation, 8x the inference)."""
    flips = [a for n in range(4) for a in itertools.combinations((2, 3, 4), n)] if mirror else [()]
    total = None
    for axes in flips:
        x = torch.flip(image, axes) if axes else image
        with torch.autocast(image.device.type, dtype=torch.float16, enabled=image.device.type == "cuda"):
            logits = sliding_window_inference(x, tuple(final_patch), sw_batch_size, model, overlap=overlap,
                                              mode="gaussian")
        p = torch.softmax(logits.float(), 1)
        p = torch.flip(p, axes) if axes else p
        total = p if total is None else total + p
    assert total is not None
    return total / len(flips)


def check_mirroring(augment: str) -> None:
    """Refuse test-time mirroring for a run whose training never mirrored its patches.

    Such a network has not learnt to segment mirrored images (on Hippocampus, whose classes are the
    anterior and posterior parts, its mirrored average scored Dice 0.05 against 0.88 plain), so
    averaging over mirrored copies would wreck its output.
    """
    if augment_preset(augment).p_mirror <= 0:
        raise PgpsError(f"--mirror: this run trained without mirroring (augmentation {augment!r}), so it never "
                        "learnt mirrored images; leave out --mirror, or train with --augment default")


def evaluate(
    model: torch.nn.Module,
    ds: PreparedDataset,
    cases: list[int],
    final_patch: tuple[int, int, int],
    device: torch.device,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    mirror: bool = False,
    relabel: np.ndarray | None = None,
) -> dict[str, Any]:
    """Sliding-window inference at the final patch size (``mirror``: averaged over the 8 mirrored
    copies); mean foreground Dice.  ``relabel``: the network's class of each of ``ds``'s label values
    (data whose labels are numbered otherwise than the training data's; classes are named as the
    network's).

    Empty labels: a case whose label and prediction both lack a class says nothing about
    that class and is left out of its mean; a case whose label lacks it but whose
    prediction has it scores 0 (all false positives). ``dice_per_class`` averages each
    class over the cases left in; a class left out of every case (absent from every
    label and every prediction) has Dice NaN (``null`` in JSON). ``dice`` is the mean
    over the classes with a defined Dice (NaN if none).
    """
    model.eval()
    value_of = {int(c): v for v, c in enumerate(relabel)} if relabel is not None else {}
    scores = []
    for i in cases:
        image = torch.from_numpy(np.array(ds.image(i)))[None].to(device)
        probs = window_probs(model, image, final_patch, sw_batch_size, overlap, mirror)
        label = np.array(ds.label(i))
        label = torch.from_numpy(label if relabel is None else relabel[label]).to(device)
        scores.append(dice_scores(probs.argmax(1)[0], label, ds.num_classes))
    names = [ds.labels[value_of.get(k, k)] for k in range(1, ds.num_classes)]
    return dice_report(scores, [ds.case_ids[i] for i in cases], names)


def dice_report(scores: Sequence[np.ndarray], case_ids: Sequence[str], class_names: Sequence[str]) -> dict[str, Any]:
    """``evaluate``'s result from each case's :func:`dice_scores` (see :func:`evaluate` for the empty-class
    rule): ``dice``, ``dice_per_class``, ``dice_per_case`` (case id to class to Dice, NaN where the case has
    the class in neither its label nor its prediction) and ``cases``."""
    table = np.array(scores, dtype=np.float64).reshape(len(case_ids), len(class_names))
    per_class = _nanmean(table, axis=0)
    return {
        "dice": float(_nanmean(per_class)),
        "dice_per_class": {n: float(v) for n, v in zip(class_names, per_class)},
        "dice_per_case": {c: {n: float(v) for n, v in zip(class_names, row)} for c, row in zip(case_ids, table)},
        "cases": len(case_ids),
    }


def evaluate_run(
    run_dir: str | Path, ds: PreparedDataset, device: str = "auto", *, cases: list[int] | None = None,
    mirror: bool = False, relabel: np.ndarray | None = None,
) -> dict[str, Any]:
    """Evaluate the network of a run folder on ``cases`` of ``ds`` (default: every case; ``relabel``: see
    :func:`evaluate`)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise PgpsError(f"{path} does not exist; give a run folder written by 'pgps-tune train'")
    dev = resolve_device(device)
    fix = "give a run folder written by 'pgps-tune train', or retrain the run"
    ck = read_checkpoint(path, fix)
    cfg = ck["config"]
    schedule = Schedule.from_dict(ck["schedule"], source=str(path))
    num_classes, channels = ck["num_classes"], ck["channels"]
    if (num_classes, channels) != (ds.num_classes, ds.channels):
        raise PgpsError(
            f"the run was trained on {channels} channel(s) and {num_classes} classes, but {ds.name} has "
            f"{ds.channels} and {ds.num_classes}; evaluate on data of the same task"
        )
    built: list[Any] = []

    def network() -> None:
        config = TrainConfig.from_dict(cfg)
        net = place(network_for(config, channels, num_classes, schedule), config.network, dev, schedule.final_patch)
        net.load_state_dict(ck["model"])
        built.extend([net, int(cfg["sw_batch_size"]), float(cfg["sw_overlap"])])

    _restore(path, fix, [("config and model", network)])
    net, sw_batch_size, overlap = built
    if mirror:
        check_mirroring(TrainConfig.from_dict(cfg).augment)
    cases = list(range(len(ds))) if cases is None else cases
    return evaluate(net, ds, cases, schedule.final_patch, dev, sw_batch_size, overlap, mirror, relabel)
