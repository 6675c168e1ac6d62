#!/usr/bin/env python
"""What Tune's experiment snapshot costs the sweep driver, by snapshot period and sweep size.

Tune rewrites its experiment state (every trial's JSON, the searcher's and the callbacks' state) at
most every ``TUNE_GLOBAL_CHECKPOINT_S`` seconds, and at once after a trial checkpoints when
``CheckpointConfig(num_to_keep)`` checkpoints have passed since the last snapshot (pgps-tune keeps
one, so after every checkpoint).  The file grows with the trials, so a short period costs the driver
more the larger the sweep.  This runs one Tune experiment per period with a trivial trainable
(``--reports`` reports per trial, each with a checkpoint; no pgps-tune code, only Ray), and times
Tune's ``save_to_dir`` (wrapped: a private method of Ray 2.60's TuneController).

    .venv/bin/python scripts/bench_tune_snapshot.py --trials 300 --periods 0 1 auto
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _trainable(config):
    from ray import tune

    for i in range(config["reports"]):
        with tempfile.TemporaryDirectory() as d:
            Path(d, "state").write_text(str(i))
            tune.report({"score": config["x"] * i}, checkpoint=tune.Checkpoint.from_directory(d))


def run(trials: int, period: str, reports: int, storage: Path) -> dict:
    from ray import tune
    from ray.tune.execution import tune_controller

    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = period  # read when Tune builds its controller, in fit()
    saves = [0, 0.0]
    save_to_dir = tune_controller.TuneController.save_to_dir

    def timed(self):
        t = time.perf_counter()
        save_to_dir(self)
        saves[0] += 1
        saves[1] += time.perf_counter() - t

    tune_controller.TuneController.save_to_dir = timed
    try:
        name = f"n{trials}-p{period}"
        tuner = tune.Tuner(
            _trainable, param_space={"x": tune.uniform(0, 1), "reports": reports},
            tune_config=tune.TuneConfig(num_samples=trials, metric="score", mode="max", reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(storage), name=name, verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        t = time.perf_counter()
        tuner.fit()
        wall = time.perf_counter() - t
    finally:
        tune_controller.TuneController.save_to_dir = save_to_dir
    state = max((p for p in (storage / name).glob("experiment_state-*.json")), key=lambda p: p.stat().st_mtime)
    return {"period": period, "wall": wall, "saves": saves[0], "save_s": saves[1],
            "state_kb": state.stat().st_size / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--reports", type=int, default=3, help="reports (each with a checkpoint) per trial")
    ap.add_argument("--periods", nargs="+", default=["0", "1", "auto"],
                    help="values of TUNE_GLOBAL_CHECKPOINT_S to compare (seconds, or auto)")
    a = ap.parse_args(argv)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    import ray

    from pgps_tune.tuner import SNAPSHOT_PERIOD_S

    ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for period in a.periods:
            rows.append(run(a.trials, period, a.reports, Path(storage)))
    ray.shutdown()
    print(f"Command: `.venv/bin/python scripts/bench_tune_snapshot.py --trials {a.trials} --reports {a.reports} "
          f"--periods {' '.join(a.periods)}`\n")
    print(f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, ray {ray.__version__}; "
          f"{a.trials} trials x {a.reports} reports, each with a checkpoint; pgps-tune's period: {SNAPSHOT_PERIOD_S}\n")
    print("| TUNE_GLOBAL_CHECKPOINT_S | sweep wall (s) | snapshots | snapshot time (s) | share of wall "
          "| last state (KiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['period']} | {r['wall']:.1f} | {r['saves']} | {r['save_s']:.1f} | {r['save_s'] / r['wall']:.0%} "
              f"| {r['state_kb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
