"""The progressive sampler: the batch of iteration ``i`` as a pure function of ``i``.

The stage (patch size and batch size) is looked up from the schedule for every
iteration index (for random patch-size sampling, drawn by the schedule from
``(seed, i)``), and the random choices come from a generator seeded by
``(seed, i)``.  Hence the sampler is deterministic, gives identical batches
whatever the number of DataLoader workers, changes stage exactly at the
boundary without rebuilding loaders, and resumes in the middle of a stage by
simply starting from the next iteration index.

Loading does not grow with the batch: a batch reads at most
``volumes_per_batch`` volumes (default: the baseline batch size) and cuts
several crops from each, as the paper's performance mode does.

With augmentation (``augment``, a preset name from :mod:`pgps_tune.config`), the
batch's transform parameters come from a second stream of the same ``(seed, i)``
and each crop is a larger region around the same centre (see
:mod:`pgps_tune.augment`); :meth:`ProgressiveSampler.cut` returns regions and
parameters, :meth:`ProgressiveSampler.batch` the finished patches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pgps_tune import augment as aug
from pgps_tune.config import augment_preset
from pgps_tune.data import PreparedDataset
from pgps_tune.schedule import Schedule

T = TypeVar("T")


def crop(volume: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Crop ``volume[..., x, y, z]`` at ``start`` (may be negative or overrun), zero-padded."""
    spatial = volume.shape[-3:]
    out = np.zeros(volume.shape[:-3] + tuple(size), dtype=volume.dtype)
    src, dst = [], []
    for a in range(3):
        lo = max(start[a], 0)
        hi = max(lo, min(start[a] + size[a], spatial[a]))  # lo: a patch wholly outside gets nothing
        src.append(slice(lo, hi))
        dst.append(slice(lo - start[a], hi - start[a]))
    out[(..., *dst)] = volume[(..., *src)]
    return out


def crops(volume: np.ndarray, starts: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Crops [n, ..., *size] of ``volume[..., x, y, z]`` at ``starts`` [n, 3], zero-padded like :func:`crop`.

    Hundreds of small crops of one volume are one gather: their bounding box is cut once
    and the crops are read as windows of it, so the cost follows the voxels rather than
    the number of crops.  Crops scattered over a large volume (a box much larger than
    the crops) are cut one by one instead, so that a big volume is never copied whole.
    """
    starts = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
    lo, hi = starts.min(0), starts.max(0) + np.asarray(size)
    if np.prod(hi - lo) > 4 * len(starts) * np.prod(size):
        return np.stack([crop(volume, st, size) for st in starts])
    box = crop(volume, lo, hi - lo)
    windows = np.lib.stride_tricks.sliding_window_view(box, tuple(size), axis=(-3, -2, -1))
    at = starts - lo
    return np.moveaxis(windows[(..., at[:, 0], at[:, 1], at[:, 2], slice(None), slice(None), slice(None))], -4, 0)


class ProgressiveSampler:
    """Cuts the batch of any iteration of a schedule from a prepared dataset."""

    def __init__(
        self,
        ds: PreparedDataset,
        cases: Sequence[int],
        schedule: Schedule,
        iterations_per_epoch: int,
        seed: int = 0,
        fg_ratio: float = 0.5,
        volumes_per_batch: int | None = None,
        augment: str = "none",
    ) -> None:
        if not cases:
            raise ValueError("the sampler needs at least one training case")
        self.augment = augment_preset(augment)
        self.thin_axis = aug.thin_axis(schedule.final_patch, self.augment)
        self.ds = ds
        self.cases = list(cases)
        self.schedule = schedule
        self.iterations_per_epoch = iterations_per_epoch
        self.seed = seed
        self.fg_ratio = fg_ratio
        self.volumes_per_batch = volumes_per_batch or schedule.baseline_batch_size
        self._images: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}
        self._fg: dict[int, dict[int, np.ndarray]] = {}

    @property
    def total_iterations(self) -> int:
        return self.schedule.epochs * self.iterations_per_epoch

    def stage_index(self, iteration: int) -> int:
        """The stage of ``iteration``: of its epoch, or drawn from ``(seed, iteration)`` for random sampling."""
        return self.schedule.stage_index_of_iteration(iteration, self.iterations_per_epoch, self.seed)

    def _volume(self, case: int) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        if case not in self._images:  # memory-mapped once per process (and worker)
            self._images[case] = self.ds.image(case)
            self._labels[case] = self.ds.label(case)
            self._fg[case] = self.ds.fg(case)
        return self._images[case], self._labels[case], self._fg[case]

    def plan_batch(self, iteration: int) -> tuple[int, np.ndarray, np.ndarray, np.random.Generator]:
        """The random choices of one batch: stage, volume picks, foreground flags, crop RNG."""
        k = self.stage_index(iteration)
        b = self.schedule.stages[k].batch_size
        rng = np.random.default_rng([self.seed, iteration])
        n_vol = min(b, self.volumes_per_batch)
        picks = rng.choice(len(self.cases), n_vol, replace=len(self.cases) < n_vol)
        is_fg = np.zeros(b, dtype=bool)
        is_fg[rng.permutation(b)[: round(self.fg_ratio * b)]] = True
        return k, picks, is_fg, rng

    def cut(self, iteration: int) -> dict[str, Any]:
        """The crops of one batch, before augmentation.

        ``image`` [B,C,*region] float32 and ``label`` [B,1,*region] uint8, where the
        region is the patch itself without augmentation, and ``augment`` holds the
        batch's transform parameters (None without augmentation).
        """
        k, picks, is_fg, rng = self.plan_batch(iteration)
        patch = self.schedule.stages[k].patch_size
        b = len(is_fg)
        params = None
        region = patch
        if not self.augment.is_identity:
            aug_rng = np.random.default_rng(np.random.SeedSequence([self.seed, iteration]).spawn(1)[0])
            params = aug.draw(aug_rng, self.augment, b, self.ds.channels, patch, self.thin_axis)
            region = aug.region_size(params, patch)
        margin = np.array([(r - p) // 2 for r, p in zip(region, patch)])  # same centre as the patch
        images = np.empty((b, self.ds.channels, *region), dtype=np.float32)
        labels = np.empty((b, 1, *region), dtype=np.uint8)
        draws = rng.random((b, 5))  # per crop: class, voxel, and a start per axis
        for v, case in enumerate(picks):  # crop j comes from volume j % n_vol: ceil(b / n_vol) crops each
            img, seg, fg = self._volume(self.cases[case])
            mine = slice(v, b, len(picks))
            starts = self._starts(draws[mine], is_fg[mine], seg.shape, patch, fg) - margin
            images[mine] = crops(img, starts, region)
            labels[mine, 0] = crops(seg, starts, region)
        return {"image": images, "label": labels, "stage": k, "iteration": iteration, "augment": params}

    def batch(self, iteration: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(images [B,C,*patch] float32, labels [B,1,*patch] uint8, stage index), augmented on the CPU."""
        c = self.cut(iteration)
        if c["augment"] is None:
            return c["image"], c["label"], c["stage"]
        image, label = aug.apply(torch.from_numpy(c["image"]), torch.from_numpy(c["label"]),
                                 aug.as_tensors(c["augment"]))
        return image.numpy(), label.numpy(), c["stage"]

    @staticmethod
    def _starts(draws: np.ndarray, centred: np.ndarray, shape, patch, fg: dict[int, np.ndarray]) -> np.ndarray:
        """Patch starts [n, 3] of one volume's crops, from uniform ``draws`` [n, 5].

        A foreground crop centres on a voxel of a random class present in the volume
        (clipped so the patch overlaps the volume as much as it can); the others start
        anywhere from which the patch covers as much of the volume as it can.
        """
        shape, patch = np.asarray(shape), np.asarray(patch)
        lo, hi = np.minimum(0, shape - patch), np.maximum(0, shape - patch)

        def pick(u: np.ndarray, n) -> np.ndarray:  # a uniform integer in [0, n) from u in [0, 1)
            return np.minimum((u * n).astype(np.int64), np.asarray(n) - 1)

        starts = lo + pick(draws[:, 2:], hi - lo + 1)
        classes = [c for c, xyz in fg.items() if len(xyz)]
        rows = np.flatnonzero(centred)
        if classes and len(rows):
            which = pick(draws[rows, 0], len(classes))
            for i, c in enumerate(classes):
                mine = rows[which == i]
                centre = fg[c][pick(draws[mine, 1], len(fg[c]))]
                starts[mine] = np.clip(centre - patch // 2, lo, hi)
        return starts


class IterationDataset(Dataset):
    """Map-style view of a sampler: item ``n`` is the batch of iteration ``start + n``.

    With ``defer_augment`` an augmented batch keeps its regions and carries the
    parameters under ``augment``, for :func:`pgps_tune.augment.to_device` to finish
    on the GPU; otherwise it is augmented here (in the loader's worker, if any).
    """

    def __init__(
        self, sampler: ProgressiveSampler, start: int = 0, stop: int | None = None, defer_augment: bool = False
    ) -> None:
        self.sampler = sampler
        self.start = start
        self.stop = sampler.total_iterations if stop is None else stop
        self.defer_augment = defer_augment

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, n: int) -> dict[str, Any]:
        it = self.start + n
        c = self.sampler.cut(it)
        image, label = torch.from_numpy(c["image"]), torch.from_numpy(c["label"])
        item: dict[str, Any] = {"iteration": it, "stage": c["stage"]}
        if c["augment"] is not None:
            params = aug.as_tensors(c["augment"])
            if self.defer_augment:
                item["augment"] = params
            else:
                image, label = aug.apply(image, label, params)
        return {"image": image, "label": label, **item}


def loader(sampler: ProgressiveSampler, start: int = 0, workers: int = 0, defer_augment: bool = False) -> DataLoader:
    """Batches from iteration ``start`` to the end of the schedule, in order."""
    return DataLoader(
        IterationDataset(sampler, start, defer_augment=defer_augment),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` in order, produced by a background thread up to ``depth`` ahead of the consumer.

    Cutting and augmenting the next batch then overlaps the training step instead of
    adding to it, which on the small first stages is most of an iteration.  Batches stay
    a pure function of ``(seed, iteration)``: the thread only changes when one is made.
    An error in the thread is raised here; closing the generator (or leaving it early)
    stops the thread and waits for it, so that nothing runs on after training stops.
    """
    ready: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item: Any, exc: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                ready.put((item, exc), timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(end, exc)

    thread = threading.Thread(target=produce, name="pgps-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()
