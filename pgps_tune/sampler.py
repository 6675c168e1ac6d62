"""The progressive sampler: the batch of iteration ``i`` as a pure function of ``i``.

The stage (patch size and batch size) is looked up from the schedule for every
iteration index, and the random choices come from a generator seeded by
``(seed, i)``.  Hence the sampler is deterministic, gives identical batches
whatever the number of DataLoader workers, changes stage exactly at the
boundary without rebuilding loaders, and resumes in the middle of a stage by
simply starting from the next iteration index.

Loading does not grow with the batch: a batch reads at most
``volumes_per_batch`` volumes (default: the baseline batch size) and cuts
several crops from each, as the paper's performance mode does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pgps_tune.data import PreparedDataset
from pgps_tune.schedule import Schedule


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
    ) -> None:
        if not cases:
            raise ValueError("the sampler needs at least one training case")
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
        return self.schedule.stage_index_at(iteration // self.iterations_per_epoch)

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

    def batch(self, iteration: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(images [B,C,*patch] float32, labels [B,1,*patch] uint8, stage index)."""
        k, picks, is_fg, rng = self.plan_batch(iteration)
        patch = self.schedule.stages[k].patch_size
        b = len(is_fg)
        images = np.empty((b, self.ds.channels, *patch), dtype=np.float32)
        labels = np.empty((b, 1, *patch), dtype=np.uint8)
        for j in range(b):  # crop j comes from volume j % n_vol: ceil(b / n_vol) crops each
            img, seg, fg = self._volume(self.cases[picks[j % len(picks)]])
            start = self._start(rng, seg.shape, patch, fg if is_fg[j] else None)
            images[j] = crop(img, start, patch)
            labels[j, 0] = crop(seg, start, patch)
        return images, labels, k

    @staticmethod
    def _start(rng, shape, patch, fg: dict[int, np.ndarray] | None) -> list[int]:
        lo = [min(0, s - p) for s, p in zip(shape, patch)]
        hi = [max(0, s - p) for s, p in zip(shape, patch)]
        classes = [c for c, xyz in (fg or {}).items() if len(xyz)]
        if classes:  # centre on a voxel of a random present class
            coords = fg[classes[rng.integers(len(classes))]]  # type: ignore[index]
            centre = coords[rng.integers(len(coords))]
            return [int(np.clip(c - p // 2, lo[a], hi[a])) for a, (c, p) in enumerate(zip(centre, patch))]
        return [int(rng.integers(lo[a], hi[a] + 1)) for a in range(3)]


class IterationDataset(Dataset):
    """Map-style view of a sampler: item ``n`` is the batch of iteration ``start + n``."""

    def __init__(self, sampler: ProgressiveSampler, start: int = 0, stop: int | None = None) -> None:
        self.sampler = sampler
        self.start = start
        self.stop = sampler.total_iterations if stop is None else stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, n: int) -> dict[str, torch.Tensor | int]:
        it = self.start + n
        images, labels, stage = self.sampler.batch(it)
        return {
            "image": torch.from_numpy(images),
            "label": torch.from_numpy(labels),
            "iteration": it,
            "stage": stage,
        }


def loader(sampler: ProgressiveSampler, start: int = 0, workers: int = 0) -> DataLoader:
    """Batches from iteration ``start`` to the end of the schedule, in order."""
    return DataLoader(
        IterationDataset(sampler, start),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )
