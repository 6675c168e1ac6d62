#!/usr/bin/env python
"""Per-stage cost of the paper schedule on a GPU: time per voxel, GPU memory and utilisation.

The device check of issues 9 (part 7) and 15 (part 4), prepared to run in one short call on a lent
GPU machine, which has torch but not Ray: this script needs only the trainer (monai, nibabel,
numpy, pyyaml), never Ray.  For every stage of each schedule it trains a few iterations through
the trainer's own code path (``Trainer._batches``: crops cut on the CPU, augmentation batched on
the device, one resampling call per batch; then ``Trainer._step``: AMP, fused optimizer, clipping)
and reports, per stage:

- ms per iteration and ns per voxel, and the ratio to the final stage's ns per voxel;
- issue 15's rule: ms per iteration <= 3 ms + voxels x the final stage's time per voxel;
- peak GPU memory allocated by PyTorch in the stage (``torch.cuda.max_memory_allocated``);
- GPU utilisation: the mean of ``torch.cuda.utilization()`` (NVML's share of time a kernel ran)
  sampled every 20 ms while the stage's timed iterations run;

and, per schedule, the predicted time fraction over the voxel fraction (stage iterations x ms per
iteration against the constant baseline's iterations at the final stage's ms per iteration).

Timing on shapes alone does not need the real images: ``--synthetic`` trains on noisy spheres of
the Hippocampus' median shape (36 x 50 x 35, planned to the same 40 x 56 x 40 patch and pools), so
nothing but the repository has to travel to the GPU machine.  On a machine without a GPU it runs on
the CPU (the memory and utilisation columns then read "-"), which is how it is checked here::

    .venv/bin/python scripts/bench_gpu.py --synthetic --quick --iterations 2 --warmup 1
    # on the GPU machine, from the repository root (monai and nibabel carried as wheels):
    python3 scripts/bench_gpu.py --synthetic --report $OUT/bench_gpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package from this checkout, installed or not (the GPU machine has no venv)

HIPPOCAMPUS_SHAPE = (36, 50, 35)  # the median shape of MSD Hippocampus after preprocessing


class Utilisation:
    """Samples ``torch.cuda.utilization()`` on a thread while a ``with`` block runs."""

    def __init__(self, enabled: bool, every_s: float = 0.02) -> None:
        self.enabled, self.every_s, self.samples = enabled, every_s, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            self.samples.append(float(torch.cuda.utilization()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> Utilisation:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def utilisation_readable() -> str | None:
    """Why GPU utilisation cannot be read here, or None when it can."""
    import torch

    try:
        torch.cuda.utilization()
    except Exception as exc:  # noqa: BLE001 - pynvml missing or NVML refused: report it, keep timing
        return f"{type(exc).__name__}: {exc}"
    return None


def time_stage(t: Any, start: int, n: int, warmup: int, cuda: bool, util: bool) -> dict[str, Any]:
    """Train ``warmup + n`` iterations from ``start``; the timed ``n`` give ms/iteration, memory, utilisation."""
    import torch

    gen = t._batches(start)
    try:
        for _ in range(warmup):
            _, _, image, label = next(gen)
            t._step(image, label)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with Utilisation(cuda and util) as u:
            t0 = time.perf_counter()
            for _ in range(n):
                _, _, image, label = next(gen)
                t._step(image, label)
            if cuda:
                torch.cuda.synchronize()
            sec = (time.perf_counter() - t0) / n
    finally:
        gen.close()
    return {"ms": 1e3 * sec, "voxels": label.numel(), "peak_mib": torch.cuda.max_memory_allocated() / 2**20
            if cuda else None, "util": u.mean()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", help="an MSD-layout dataset folder")
    shape = "x".join(map(str, HIPPOCAMPUS_SHAPE))
    src.add_argument("--synthetic", action="store_true", help=f"noisy spheres of shape {shape} (the default)")
    ap.add_argument("--schedules", nargs="+", default=["paper-performance", "paper-resource"],
                    help="paper-performance (issue 9.7) and/or paper-resource (issue 15.4)")
    ap.add_argument("--augment", default="default", help="augmentation preset (default: default)")
    ap.add_argument("--batch-size", type=int, default=2, help="baseline batch size (the CLI default)")
    ap.add_argument("--epochs", type=int, default=50, help="the CLI default; sets each stage's share of iterations")
    ap.add_argument("--iterations", type=int, default=10, help="timed iterations per stage")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per stage before timing")
    ap.add_argument("--workers", type=int, default=0, help="loader worker processes (the trainer's default is 0)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="first, middle and last stage only")
    ap.add_argument("--report", help="also write the Markdown report here")
    a = ap.parse_args()

    import torch
    from bench_iteration import rule, time_fraction  # issue 15.4's rule and prediction, as on the CPU

    from pgps_tune import schedule as sch
    from pgps_tune.config import TrainConfig
    from pgps_tune.data import plan_patch, prepare, split
    from pgps_tune.errors import atomic_write_text
    from pgps_tune.trainer import Trainer, resolve_device

    dev = resolve_device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    cache = Path(tempfile.mkdtemp(prefix="pgps-bench-gpu-"))
    ds = (prepare(a.data, cache_root=cache) if a.data
          else prepare("synthetic", cache_root=cache, synthetic_cases=12, synthetic_shape=HIPPOCAMPUS_SHAPE))
    plan = plan_patch(ds.median_shape, ds.spacing)
    train_cases, val_cases = split(ds, 0.2, seed=0)
    cfg = TrainConfig(device=dev.type, augment=a.augment, workers=a.workers)
    util_note = utilisation_readable() if cuda else None
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    t_start = time.perf_counter()
    lines = [
        "# Per-stage cost on the device: time per voxel, memory, utilisation", "",
        f"Command: `python3 {shlex.join(['scripts/bench_gpu.py', *sys.argv[1:]])}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, GPU {gpu}, torch {torch.__version__}, device "
        f"{dev.type}; data {'synthetic ' + 'x'.join(map(str, HIPPOCAMPUS_SHAPE)) if not a.data else ds.name}, "
        f"final patch {'x'.join(map(str, plan.final_patch))}, pools {list(plan.pools)}; recipe defaults "
        f"({cfg.network}, {cfg.optimizer}, augmentation {a.augment}, {a.workers} loader workers), baseline batch "
        f"{a.batch_size}; {a.warmup} warm-up + {a.iterations} timed iterations per stage.",
    ]
    if util_note:
        lines += ["", f"GPU utilisation could not be read ({util_note}): that column reads '-'."]
    for name in a.schedules:
        preset, _, mode = name.partition("-")
        s = sch.preset(preset, plan.final_patch, plan.pools, a.batch_size, a.epochs, mode or "resource")
        t = Trainer(ds, train_cases, val_cases, s, cfg, cache / f"run-{name}")
        ipe = cfg.iterations_per_epoch
        starts = [e * ipe for e in s.stage_starts()]
        idx = list(range(len(s.stages)))
        if a.quick:
            idx = sorted({0, len(idx) // 2, len(idx) - 1})
        res: dict[int, dict[str, Any]] = {}
        for k in idx:
            res[k] = time_stage(t, starts[k], a.iterations, a.warmup, cuda, util_note is None)
            st = s.stages[k]
            print(f"{name} stage {k} {'x'.join(map(str, st.patch_size))} batch {st.batch_size}: "
                  f"{res[k]['ms']:.2f} ms/iteration", flush=True)
        final = res[idx[-1]]
        ns_final = 1e6 * final["ms"] / final["voxels"]
        lines += ["", f"## {name}", "",
                  "| stage | patch | batch | voxels/iter | ms/iter | ns/voxel | vs final | 3 ms + voxels rule "
                  "| peak GPU MiB | GPU utilisation % |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k in idx:
            r, st = res[k], s.stages[k]
            ns = 1e6 * r["ms"] / r["voxels"]
            mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            util = "-" if r["util"] is None else f"{r['util']:.0f}"
            lines.append(f"| {k} | {'x'.join(map(str, st.patch_size))} | {st.batch_size} | {r['voxels']} | "
                         f"{r['ms']:.2f} | {ns:.1f} | {ns / ns_final:.2f} | {rule(r['ms'], r['voxels'], ns_final)} | "
                         f"{mem} | {util} |")
        if not a.quick:
            time_frac = time_fraction(s, {k: r["ms"] for k, r in res.items()})
            vox_frac = s.voxel_fraction()
            lines += ["", f"Predicted time fraction {time_frac:.3f} over voxel fraction {vox_frac:.3f}: ratio "
                      f"**{time_frac / vox_frac:.2f}** (issue 15's target for paper-resource: <= 1.10)."]
    lines += ["", f"{time.perf_counter() - t_start:.0f} s in all."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.report:
        atomic_write_text(a.report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
