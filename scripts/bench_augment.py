#!/usr/bin/env python
"""Does augmentation keep up with the network in every stage of a paper schedule?

For each stage of the paper schedule (performance mode by default: hundreds of tiny
patches per batch in the first stages) at a dataset's planned final patch, it times, on
the stage's own batches (a batch is a pure function of its iteration):

- data: what the trainer's loader does for one batch with the default number of loader
  workers (0: in the training process): cut the regions and augment them;
- model: one step of the trainer itself (``Trainer._step``: forward, Dice+CE, backward,
  clipping, fused AdamW, with the trainer's convolution path and memory layout per patch)
  on the augmented batch;

each as the best of ``--repeats`` timings (the machine is shared: the best run is the
least disturbed one), and reports the data and model throughput (voxels/s) with their
ratio (target >= 1.5 in every stage), and the training time per voxel (data + model:
the default loader runs in the training process) against the final stage's (target
<= 1.15).  The data rate without augmentation (cutting only) is given for comparison.

On a machine shared with other jobs, wall-clock times mostly measure the neighbours:
``--threads 1 --clock cpu`` counts this process's CPU time instead (time spent waiting
for a core is left out), which is what one core would take on a quiet machine.

    .venv/bin/python scripts/bench_augment.py --threads 1 --clock cpu --report docs/bench_augment.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def best_time(run: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of the fastest of ``repeats`` runs (after one untimed warm-up run)."""
    run()
    times = []
    for _ in range(repeats):
        t = clock()
        run()
        times.append(clock() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--mode", default="performance", help="paper schedule mode: performance or resource")
    ap.add_argument("--augment", default="default", help="augmentation preset (default: default)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2, help="distinct batches timed per stage")
    ap.add_argument("--repeats", type=int, default=3, help="timings per batch; the best counts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, as the trainer)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall-clock time, or this process's CPU time (with --threads 1)")
    ap.add_argument("--report", help="also write the Markdown table here")
    a = ap.parse_args()

    import torch

    from pgps_tune import schedule as sch
    from pgps_tune.augment import to_device
    from pgps_tune.config import TrainConfig
    from pgps_tune.data import plan_patch, prepare, split
    from pgps_tune.errors import PgpsError, atomic_write_text
    from pgps_tune.sampler import IterationDataset, ProgressiveSampler
    from pgps_tune.trainer import Trainer

    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    if a.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit("--clock cpu needs --threads 1 (CPU time adds up the threads)")
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    try:
        ds = prepare(a.data)
    except PgpsError as exc:
        raise SystemExit(f"error: {exc}") from None
    cfg = TrainConfig(augment=a.augment)
    if cfg.workers:
        raise SystemExit("this benchmark times the in-process loader; the default workers changed, update it")
    plan = plan_patch(ds.median_shape, ds.spacing)
    s = sch.paper(plan.final_patch, plan.pools, a.batch_size, 1000, a.mode)
    train_cases, val_cases = split(ds, 0.2, seed=0)
    samplers = {name: ProgressiveSampler(ds, train_cases, s, 1, augment=name) for name in (a.augment, "none")}
    cpu = torch.device("cpu")
    # the trainer's own step (its convolution path, memory layout per patch, norm kernel, fused
    # optimizer, clipping), on batches this script cuts and times itself
    trainer = Trainer(ds, train_cases, val_cases, s, replace(cfg, device="cpu", iterations_per_epoch=1),
                      tempfile.mkdtemp())
    train_step = trainer._step

    data = {name: IterationDataset(smp) for name, smp in samplers.items()}  # what the loader serves
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    for k, st in enumerate(s.stages):
        first = s.stage_starts()[k]  # one iteration per epoch: iteration == epoch
        its = range(first, first + a.iterations)
        data_s = none_s = model_s = 0.0
        region = 0
        for it in its:
            data_s += best_time(lambda it=it: data[a.augment][it], a.repeats, clock)
            none_s += best_time(lambda it=it: data["none"][it], a.repeats, clock)
            image, label = to_device(data[a.augment][it], cpu)
            model_s += best_time(lambda image=image, label=label: train_step(image, label), a.repeats, clock)
            region += math.prod(samplers[a.augment].cut(it)["image"].shape[2:])
        voxels = a.iterations * st.batch_size * st.patch_voxels
        rows.append({
            "stage": k, "patch": "x".join(map(str, st.patch_size)), "batch": st.batch_size,
            "region": region / a.iterations / st.patch_voxels, "data": voxels / data_s,
            "none": voxels / none_s, "model": voxels / model_s, "train_ns": (data_s + model_s) / voxels * 1e9,
        })
        print(f"stage {k} {rows[-1]['patch']} b{st.batch_size}: data/model {model_s / data_s:.1f}x", flush=True)
    elapsed = time.perf_counter() - t0
    final_ns = rows[-1]["train_ns"]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {a.clock} clock, {time.strftime('%Y-%m-%d')}",
        f"Data: {ds.name}, final patch {'x'.join(map(str, plan.final_patch))}, pools {list(plan.pools)}; paper "
        f"{a.mode} schedule, baseline batch {a.batch_size}; default network ({cfg.network}), augmentation "
        f"'{a.augment}', {cfg.workers} loader workers (the default); per stage {a.iterations} batches, each the best "
        f"of {a.repeats} timings ({elapsed:.0f} s in all: a quick look)",
        "",
        "| stage | patch | batch | region/patch | data Mvox/s | model Mvox/s | data/model | train ns/voxel "
        "| vs final | data without augmentation Mvox/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['patch']} | {r['batch']} | {r['region']:.1f} | {r['data'] / 1e6:.2f} | "
            f"{r['model'] / 1e6:.2f} | {r['data'] / r['model']:.1f}x | {r['train_ns']:.0f} | "
            f"{r['train_ns'] / final_ns:.2f} | {r['none'] / 1e6:.1f} |"
        )
    worst = min(r["data"] / r["model"] for r in rows)
    costliest = max(r["train_ns"] / final_ns for r in rows)
    lines += [
        "",
        f"- slowest data/model ratio {worst:.1f}x (target >= 1.5x): {'met' if worst >= 1.5 else 'MISSED'}",
        f"- costliest stage per voxel of training {costliest:.2f}x the final stage's (target <= 1.15): "
        f"{'met' if costliest <= 1.15 else 'MISSED'}",
        "",
        "region/patch: voxels cut per patch voxel (the larger region the spatial transform resamples).",
        "train ns/voxel: data + model, as the default in-process loader adds them up.",
    ]
    report = "\n".join(lines)
    print(report)
    if a.report:
        cmd = shlex.join(["scripts/bench_augment.py", *sys.argv[1:]])
        atomic_write_text(a.report, f"# Augmentation cost per stage\n\nCommand: `.venv/bin/python {cmd}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
