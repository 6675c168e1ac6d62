#!/usr/bin/env python
"""Cost per voxel of each stage of a schedule, network and sampler apart, one process alone.

For every stage (patch, batch) of the schedule it times, in this process only:
the network's training step (forward, Dice+CE loss, backward, AdamW step) on a
random batch, and the sampler cutting that stage's batches from the prepared
data.  Both are given in nanoseconds per voxel, and as a ratio to the final
stage.  This separates what the network costs on small patches from what the
data pipeline and other processes add in a real run (compare the per-stage
costs that scripts/bench_curriculum.py reports).

    .venv/bin/python scripts/bench_stage_cost.py --threads 1 --report docs/bench_stage_cost.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--schedule", default="paper-performance", help="constant, paper-resource or paper-performance")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per stage (after 2 warm-up steps)")
    ap.add_argument("--channels-last", action="store_true", help="also time the network in channels_last_3d")
    ap.add_argument("--report", help="also write a Markdown report here")
    ap.add_argument("--quick", action="store_true", help="first, middle and last stage only")
    a = ap.parse_args()

    import torch
    from monai.losses import DiceCELoss

    from pgps_tune import schedule as sch
    from pgps_tune.data import plan_patch, prepare, split
    from pgps_tune.errors import PgpsError, atomic_write_text
    from pgps_tune.network import build_network
    from pgps_tune.sampler import ProgressiveSampler

    torch.set_num_threads(a.threads)
    try:
        ds = prepare(a.data)
    except PgpsError as exc:
        raise SystemExit(f"error: {exc}") from None
    plan = plan_patch(ds.median_shape, ds.spacing)
    preset, _, mode = a.schedule.partition("-")
    s = sch.preset(preset, plan.final_patch, plan.pools, a.batch_size, 1000, mode or "resource")
    train_cases, _ = split(ds, 0.2, seed=0)
    sampler = ProgressiveSampler(ds, train_cases, s, iterations_per_epoch=1)
    starts = s.stage_starts()
    idx = list(range(len(s.stages)))
    if a.quick:
        idx = sorted({0, len(idx) // 2, len(idx) - 1})
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    layouts = [False, True] if a.channels_last else [False]
    rows = []
    for k in idx:
        st = s.stages[k]
        voxels = st.batch_size * int(np.prod(st.patch_size))
        sampler.batch(starts[k])  # map the volumes once
        t0 = time.perf_counter()
        for i in range(a.steps):
            sampler.batch(starts[k] + i)
        samp = (time.perf_counter() - t0) / a.steps / voxels * 1e9
        net = {}
        for cl in layouts:
            torch.manual_seed(0)
            model = build_network("unet", ds.channels, ds.num_classes, plan.pools)
            opt = torch.optim.AdamW(model.parameters(), 3e-3)
            x = torch.randn(st.batch_size, ds.channels, *st.patch_size)
            y = torch.randint(0, ds.num_classes, (st.batch_size, 1, *st.patch_size))
            if cl:
                model, x = model.to(memory_format=torch.channels_last_3d), x.to(memory_format=torch.channels_last_3d)
            for i in range(2 + a.steps):
                if i == 2:
                    t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
            net[cl] = (time.perf_counter() - t0) / a.steps / voxels * 1e9
        rows.append((k, st.patch_size, st.batch_size, net, samp))
        print(f"stage {k}: {'x'.join(map(str, st.patch_size))} b{st.batch_size}: network {net[False]:.0f} ns/voxel, "
              f"sampler {samp:.0f} ns/voxel", flush=True)
    last = rows[-1]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} thread(s), "
        f"this process alone; {ds.name}, {a.schedule}, baseline batch {a.batch_size}",
        "",
        "| stage | patch | batch | network ns/voxel | vs final | sampler ns/voxel | network + sampler vs final |"
        + (" channels_last_3d network ns/voxel |" if a.channels_last else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if a.channels_last else ""),
    ]
    for k, patch, b, net, samp in rows:
        total = (net[False] + samp) / (last[3][False] + last[4])
        extra = f" {net[True]:.0f} |" if a.channels_last else ""
        lines.append(f"| {k} | {'x'.join(map(str, patch))} | {b} | {net[False]:.0f} | "
                     f"{net[False] / last[3][False]:.2f} | {samp:.0f} | {total:.2f} |{extra}")
    report = "\n".join(lines)
    print(report)
    if a.report:
        cmd = shlex.join(["scripts/bench_stage_cost.py", *sys.argv[1:]])
        atomic_write_text(Path(a.report), f"# Stage cost\n\nCommand: `.venv/bin/python {cmd}`\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
