"""Shared fixtures: an isolated cache and tiny MSD datasets written as NIfTI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# The longest test files, longest first (their summed test durations on 2 cores, 2026-12-06: 205, 179, 152,
# 116, 102 s of about 1,080 in all).  With ``-n 2 --dist loadfile --no-loadscope-reorder`` (pyproject's
# addopts) xdist hands out files in collection order; starting with the longest ones lets the two workers
# finish together instead of one running a long file alone at the end (650 s against 540 of work each).
LONGEST_FIRST = ("test_tuner_recovery.py", "test_fidelity.py", "test_tuner.py", "test_benchmarks.py", "test_nnunet.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PGPS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_results_store(tmp_path_factory):
    """No test writes into the user's results store (~/.local/share/pgps-tune/results): a test that exports
    without naming a store gets this session's own; tests that need one of their own still set it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPS_RESULTS_DIR", str(tmp_path_factory.getbasetemp() / "results-store"))
        yield


def write_case(root: Path, name: str, image: np.ndarray, label: np.ndarray,
               spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, str]:
    affine = np.diag([*spacing, 1.0])
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / f"{name}.nii.gz")
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def blob_case(shape: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume with two labelled blobs (classes 1 and 2)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    label = np.zeros(shape, dtype=np.uint8)
    for cls in (1, 2):
        centre = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        r = min(shape) / 5
        label[np.linalg.norm(grid - centre, axis=-1) < r] = cls
    image = label * 1.0 + rng.normal(0, 0.3, shape)
    return image, label


def make_msd(root: Path, n: int = 6, shape: Sequence[int] = (20, 24, 16),
             spacings: Sequence[Sequence[float]] | None = None) -> Path:
    training = []
    for i in range(n):
        image, label = blob_case(shape, i)
        sp = spacings[i] if spacings else (1.0, 1.0, 1.0)
        training.append(write_case(root, f"case_{i:03d}", image, label, sp))
    (root / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": n, "training": training,
    }))
    return root


@pytest.fixture
def tiny_msd(tmp_path) -> Path:
    return make_msd(tmp_path / "tiny")


@pytest.fixture(scope="session")
def _session_ray():
    """Stops the shared local Ray (see :func:`shared_ray`) once the whole run is over."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def shared_ray(_session_ray):
    """A local Ray kept between the in-process sweeps of the whole run (each would start and stop one of
    its own, about 5 s each on 2 cores; the sweep leaves a caller's Ray running, the path a notebook
    takes).  Started like ``tune`` starts its own, on this test's environment if none runs yet.  Only for
    sweeps whose trials need nothing of a test's environment: Ray's workers keep the environment Ray
    started with (the data cache every test shares is set before, by ``_isolated_cache``).  Tests that
    kill, interrupt, join a cluster or inject failures start their own.
    """
    import ray

    from pgps_tune.tuner import start_ray

    if not ray.is_initialized():
        start_ray(None)
    yield


def ray_processes(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (a Ray temp folder): a local Ray's raylet, workers, ..."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue  # exited meanwhile
    return found


@pytest.fixture
def ray_tmp():
    """A Ray temp folder of this test's own (short: Ray's socket paths have a length limit)."""
    path = tempfile.mkdtemp(prefix="pgps-ray-", dir="/tmp")
    yield path
    for pid in ray_processes(path):  # what a test killed with -9 left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def sweep_meta(folder: Path, name: str = "demo", **over) -> dict:
    """A finished sweep's sweep.json (as written by the tuner) for a sweep ``name`` in ``folder``; ``over``
    replaces keys (``sweep=`` renames it without renaming its experiments)."""
    meta = {"format_version": 2, "sweep": name, "space": "s.yaml", "dataset": "synthetic", "storage": None,
            "storage_path": str(folder / "ray"), "experiments": {"search": f"{name}-search"},
            "objective": {"type": "max_dice"}, "final_patch": [16, 16, 16], "finished": True,
            "asha": {"time_attr": "epoch", "max_t": 10, "grace_period": 2, "reduction_factor": 2, "brackets": 1}}
    return {**meta, **over}


def trial_setup(folder: Path, **budget) -> dict:
    """A finished sweep's sweep.json ``trial_setup`` on synthetic data (what confirm reads); ``budget`` replaces
    budget keys."""
    return {"data": "synthetic", "final_patch": [16, 16, 16], "pools": [2, 2, 2], "cache_root": str(folder / "cache"),
            "objective": {"type": "max_dice"},
            "budget": {"epochs": 10, "iterations_per_epoch": 2, "batch_size": 2, "seed": 0, "split_seed": 0,
                       "synthetic_cases": 4, "synthetic_shape": [16, 16, 16], "network": "unet", "token_size": 16,
                       "val_every": 2, "val_fraction": 0.25, **budget}}
