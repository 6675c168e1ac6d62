#!/usr/bin/env python
"""Fixed cost of a training iteration per stage, before and after issue 15, in one run.

For every stage of a schedule (default: paper-resource at the CLI defaults: AdamW 3e-3,
batch 2, the default UNet, augmentation ``default``) it times the trainer's own code path
for a few iterations: the batch hand-off (``loader`` + ``to_device`` before, the trainer's
``_batches`` after, also with its prefetch thread) followed by ``Trainer._step``.  "before" is
the trainer as it was at ``--before`` (read from git and imported as its own module), so
both run side by side in this process, interleaved stage by stage, which keeps the
ratios meaningful on a shared, noisy machine.

It also splits a "before" iteration into its pieces by wrapping the trainer's own calls
(batch, forward, loss, backward, gradient clipping, optimizer step, the rest: Python,
autocast, scaler, scheduler) and prints torch.profiler's key_averages for one iteration
of the first and last stage.  The table gives ms/iter, ns/voxel, the ratio to the final
stage's ns/voxel and the rule of issue 15.4 (ms/iter <= 3 ms + voxels x final ns/voxel),
and the predicted time fraction over voxel fraction (sum over stages of iterations x
ms/iter against the constant baseline at the final stage's ms/iter).

    .venv/bin/python scripts/bench_iteration.py --report docs/bench_iteration.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PIECES = ("batch", "forward", "loss", "backward", "clip", "optimizer", "rest")


def before_trainer_module(ref: str) -> Any:
    """``pgps_tune/trainer.py`` as it was at git ``ref``, imported as its own module."""
    text = subprocess.run(["git", "show", f"{ref}:pgps_tune/trainer.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "trainer_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("trainer_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Variant:
    """One trainer and how its batches are handed to ``_step``."""

    def __init__(self, name: str, trainer: Any, batches: Callable[[int], Any],
                 setting: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.name, self.trainer, self.batches = name, trainer, batches
        self.setting = setting  # a context in force while this variant runs (a switch of the library)

    def run(self, start: int, n: int, warmup: int, pieces: dict[str, list[float]] | None = None) -> float:
        """Seconds per iteration of ``n`` iterations from ``start`` after ``warmup`` ones."""
        it = self.batches(start)
        try:
            with self.setting():
                return self._timed(it, n, warmup, pieces)
        finally:
            close = getattr(it, "close", None)
            if close:
                close()

    def _timed(self, it: Any, n: int, warmup: int, pieces: dict[str, list[float]] | None) -> float:
        for i in range(warmup + n):
            if i == warmup:
                t0 = time.perf_counter()
                for v in (pieces or {}).values():
                    v.clear()
            a = time.perf_counter()
            image, label = next(it)
            if pieces is not None:
                pieces["batch"].append(time.perf_counter() - a)
            self.trainer._step(image, label)
        return (time.perf_counter() - t0) / n


@contextlib.contextmanager
def instance_norm_kernel() -> Any:
    """The network's instance norms through PyTorch's instance-norm path instead of group norm's kernel."""
    from pgps_tune.network import SafeInstanceNorm3d

    SafeInstanceNorm3d.group_norm_kernel = False
    try:
        yield
    finally:
        SafeInstanceNorm3d.group_norm_kernel = True


@contextlib.contextmanager
def default_layout() -> Any:
    """The network in PyTorch's default memory layout in every stage instead of channels-last from
    ``CHANNELS_LAST_MIN_VOXELS`` voxels per patch."""
    from pgps_tune import network

    network.CPU_CHANNELS_LAST = False
    try:
        yield
    finally:
        network.CPU_CHANNELS_LAST = True


def timed(fn: Callable, sink: list[float]) -> Callable:
    def wrapper(*args: Any, **kw: Any) -> Any:
        a = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            sink.append(time.perf_counter() - a)
    return wrapper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    ap.add_argument("--schedule", default="paper-resource", help="paper-resource or paper-performance")
    ap.add_argument("--epochs", type=int, default=50, help="the CLI default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations per stage, variant and round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the faster one counts")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--before", default="48b9151", help="git ref of the trainer to compare against")
    ap.add_argument("--default-layout", action="store_true",
                    help="also time today's trainer with its network in the default memory layout (on the CPU "
                         "it trains in channels-last 3D)")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile on the first and last stage (compile time counted)")
    ap.add_argument("--quick", action="store_true", help="first, middle and last stage only")
    ap.add_argument("--report", help="also write a Markdown report here")
    a = ap.parse_args()
    if a.compile:  # count the whole compilation: no kernels reused from an earlier run's cache
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

    import torch
    from torch.profiler import profile

    from pgps_tune import schedule as sch
    from pgps_tune.augment import to_device
    from pgps_tune.config import TrainConfig
    from pgps_tune.data import plan_patch, prepare, split
    from pgps_tune.errors import atomic_write_text
    from pgps_tune.sampler import loader
    from pgps_tune.trainer import Trainer

    torch.set_num_threads(a.threads)
    ds = prepare(a.data)
    plan = plan_patch(ds.median_shape, ds.spacing)
    preset, _, mode = a.schedule.partition("-")
    s = sch.preset(preset, plan.final_patch, plan.pools, 2, a.epochs, mode or "resource")
    train_cases, val_cases = split(ds, 0.2, seed=0)
    cfg = TrainConfig(device="cpu", threads=a.threads)
    ipe = cfg.iterations_per_epoch
    out = Path(tempfile.mkdtemp())
    old = before_trainer_module(a.before)

    def old_batches(t: Any) -> Callable[[int], Any]:
        def make(start: int) -> Any:  # the old fit()'s hand-off
            return (to_device(b, t.device) for b in loader(t.sampler, start, t.cfg.workers))
        return make

    def new_batches(t: Trainer) -> Callable[[int], Any]:
        def make(start: int) -> Any:
            gen = t._batches(start)
            return ((image, label) for _, _, image, label in gen), gen
        return lambda start: _Closing(*make(start))

    before_t = old.Trainer(ds, train_cases, val_cases, s, cfg, out / "before")
    after_t = Trainer(ds, train_cases, val_cases, s, cfg, out / "after")
    after_t.prefetch_depth = 0  # the default
    fetch_t = Trainer(ds, train_cases, val_cases, s, cfg, out / "prefetch")
    fetch_t.prefetch_depth = 2
    variants = [Variant("before", before_t, old_batches(before_t)), Variant("after", after_t, new_batches(after_t)),
                Variant("after, prefetch thread", fetch_t, new_batches(fetch_t))]
    # this round's two cuts, each switched off in a variant of its own
    base_t = Trainer(ds, train_cases, val_cases, s, cfg, out / "onednn")
    base_t.native_conv_max_voxels = 0
    variants.append(Variant("after, oneDNN in every stage", base_t, new_batches(base_t)))
    norm_t = Trainer(ds, train_cases, val_cases, s, cfg, out / "instnorm")
    variants.append(Variant("after, instance-norm kernel", norm_t, new_batches(norm_t), setting=instance_norm_kernel))
    fp32_t = Trainer(ds, train_cases, val_cases, s, cfg.replace(cpu_precision="fp32"), out / "fp32")
    variants.append(Variant("after, fp32", fp32_t, new_batches(fp32_t)))
    if a.default_layout:
        with default_layout():  # read whenever a trainer lays its network out, so in force while it runs too
            flat_t = Trainer(ds, train_cases, val_cases, s, cfg, out / "flat")
        variants.append(Variant("after, default layout", flat_t, new_batches(flat_t), setting=default_layout))

    # the pieces of a "before" iteration, by wrapping the trainer's own calls
    pieces: dict[str, list[float]] = {k: [] for k in PIECES}
    before_t.model.forward = timed(before_t.model.forward, pieces["forward"])
    before_t.loss_fn = timed(before_t.loss_fn, pieces["loss"])
    before_t.opt.step = timed(before_t.opt.step, pieces["optimizer"])
    step_total: list[float] = []
    before_t._step = timed(before_t._step, step_total)
    torch.Tensor.backward = timed(torch.Tensor.backward, pieces["backward"])
    torch.nn.utils.clip_grad_norm_ = timed(torch.nn.utils.clip_grad_norm_, pieces["clip"])

    starts = [e * ipe for e in s.stage_starts()]
    idx = list(range(len(s.stages)))
    if a.quick:
        idx = sorted({0, len(idx) // 2, len(idx) - 1})
    load = [os.getloadavg()]
    t_run = time.perf_counter()
    ms: dict[str, dict[int, float]] = {v.name: {} for v in variants}
    split_ms: dict[int, dict[str, float]] = {}
    for k in idx:
        best: dict[str, float] = {}
        for _ in range(a.rounds):
            for v in variants:
                sink = pieces if v.name == "before" else None
                if sink is not None:
                    step_total.clear()
                try:
                    sec = v.run(starts[k], a.iterations, a.warmup, sink)
                except Exception:
                    print(f"variant {v.name!r} failed at stage {k}:", file=sys.stderr, flush=True)
                    raise
                if v.name not in best or sec < best[v.name]:
                    best[v.name] = sec
                    if sink is not None:
                        step_total[:] = step_total[a.warmup:]
                        mean = {p: 1e3 * float(np.mean(pieces[p])) if pieces[p] else 0.0 for p in PIECES}
                        mean["rest"] = 1e3 * float(np.mean(step_total)) - sum(
                            mean[p] for p in PIECES if p not in ("batch", "rest"))
                        split_ms[k] = mean
        for name, sec in best.items():
            ms[name][k] = 1e3 * sec
        st = s.stages[k]
        print(f"stage {k} {'x'.join(map(str, st.patch_size))}: "
              + ", ".join(f"{n} {ms[n][k]:.1f} ms" for n in ms), flush=True)
    load.append(os.getloadavg())

    profiles = []
    for k in sorted({idx[0], idx[-1]}):
        for v in variants[:2]:
            it = v.batches(starts[k])
            image, label = next(it)
            v.trainer._step(image, label)
            with profile() as prof:
                image, label = next(it)
                v.trainer._step(image, label)
            getattr(it, "close", lambda: None)()
            profiles.append((k, v.name, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)))

    compiled = []
    if a.compile:
        for k in sorted({idx[0], idx[-1]}):
            torch._dynamo.reset()  # each stage compiled for its own shape, as a run would per stage
            t = Trainer(ds, train_cases, val_cases, s, cfg, out / f"compile{k}")
            t.model = torch.compile(t.model, dynamic=False)
            v = Variant("after + compile", t, new_batches(t))
            a0 = time.perf_counter()
            try:
                v.run(starts[k], 1, 0)
            except Exception as exc:  # a compiler failure is a finding, not the end of the benchmark
                why = str(exc).strip().splitlines()[0][:200]
                compiled.append((k, None, why))
                print(f"stage {k}: torch.compile failed: {why}", flush=True)
                continue
            first = time.perf_counter() - a0
            per = v.run(starts[k], a.iterations, a.warmup)
            compiled.append((k, first, 1e3 * per))
            print(f"stage {k}: compile + first iteration {first:.1f} s, then {1e3 * per:.1f} ms/iter", flush=True)

    report = render(a, s, idx, ms, split_ms, profiles, compiled, load, time.perf_counter() - t_run, ds, torch)
    print(report)
    if a.report:
        cmd = shlex.join(["scripts/bench_iteration.py", *sys.argv[1:]])
        atomic_write_text(Path(a.report), f"# Fixed cost of an iteration (issue 15)\n\nCommand: "
                                          f"`.venv/bin/python {cmd}`\n\n{report}\n")
    return 0


class _Closing:
    """An iterator of (image, label) that closes the trainer's batch generator behind it."""

    def __init__(self, items: Any, gen: Any) -> None:
        self.items, self.gen = items, gen

    def __next__(self) -> Any:
        return next(self.items)

    def close(self) -> None:
        self.gen.close()


def rule(ms: float, voxels: int, final_ns: float) -> str:
    """Issue 15.4's rule for one stage: ms per iteration <= 3 ms + its voxels x the final stage's ns per voxel."""
    limit = 3 + voxels * final_ns * 1e-6
    return "pass" if ms <= limit else f"FAIL (> {limit:.1f} ms)"


def time_fraction(s: Any, per: dict[int, float]) -> float:
    """Predicted training time of schedule ``s`` over the constant baseline's, from each stage's ms per
    iteration ``per``: stage epochs x ms against all epochs at the final stage's ms."""
    return sum(st.epochs * per[k] for k, st in enumerate(s.stages)) / (s.epochs * per[len(s.stages) - 1])


def render(a, s, idx, ms, split_ms, profiles, compiled, load, seconds, ds, torch) -> str:
    """The Markdown report: per-stage tables per variant, the prediction, the pieces, profiles."""
    from pgps_tune.trainer import cpu_has_bf16

    ipe = 50
    last = s.stages[-1]
    v_last = last.batch_size * int(np.prod(last.patch_size))
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} threads; "
        f"load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load[0])} at the start, "
        f"{'/'.join(f'{x:.1f}' for x in load[1])} at the end (the machine is shared: compare ratios, "
        f"not absolute times); {ds.name}, {a.schedule}, {a.epochs} epochs x {ipe} iterations, batch 2, "
        f"AdamW 3e-3, augmentation default; {a.iterations} timed iterations x {a.rounds} interleaved rounds "
        f"per stage and variant (the faster round), {seconds:.0f} s in all.",
        "",
        "\"before\" is the trainer of the git ref given with `--before`, on today's network and sampler modules; "
        "\"after\" is today's trainer with its defaults. Each of its cuts is switched off in a variant "
        "of its own: oneDNN convolutions in every stage (instead of PyTorch's own at steps of at most "
        "`Trainer.native_conv_max_voxels` voxels), PyTorch's instance-norm path (instead of group norm's "
        "kernel), fp32 in every stage (instead of bfloat16 autocast where `network.cpu_bf16` says it pays and "
        f"the CPU has it in hardware: here {'yes' if cpu_has_bf16() else 'no'})"
        + (", and the network in the default memory layout in every stage (instead of channels-last "
                     "3D from `network.CHANNELS_LAST_MIN_VOXELS` voxels per patch)" if a.default_layout else "")
        + ".",
        "",
    ]
    summary = []
    for name, per in ms.items():
        final_ns = per[idx[-1]] * 1e6 / v_last
        lines += [f"## {name}", "",
                  "| stage | patch | batch | voxels/iter | ms/iter | ns/voxel | vs final ns/voxel "
                  "| 3 ms + voxels rule |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in idx:
            st = s.stages[k]
            vox = st.batch_size * int(np.prod(st.patch_size))
            lines.append(f"| {k} | {'x'.join(map(str, st.patch_size))} | {st.batch_size} | {vox} | {per[k]:.1f} | "
                         f"{per[k] * 1e6 / vox:.0f} | {per[k] * 1e6 / vox / final_ns:.2f} | "
                         f"{rule(per[k], vox, final_ns)} |")
        lines.append("")
        if len(idx) == len(s.stages):
            frac = time_fraction(s, per)
            summary.append(f"| {name} | {frac:.3f} | {s.voxel_fraction():.3f} | {frac / s.voxel_fraction():.2f} |")
    if summary:
        lines += ["## Predicted time fraction over voxel fraction (target <= 1.10)", "",
                  "| variant | time fraction | voxel fraction | ratio |", "|---|---|---|---|", *summary, ""]
    lines += ["## Where a 'before' iteration's time goes (ms, by wrapping the trainer's calls)", "",
              "| stage | " + " | ".join(PIECES) + " |", "|---|" + "---|" * len(PIECES)]
    for k in idx:
        lines.append(f"| {k} | " + " | ".join(f"{split_ms[k][p]:.1f}" for p in PIECES) + " |")
    lines.append("")
    if compiled:
        lines += ["## torch.compile (new trainer, compile time counted)", "",
                  "| stage | compile + first iteration s | ms/iter after | ms/iter without | iterations in the run |",
                  "|---|---|---|---|---|"]
        for k, first, per in compiled:
            if first is None:  # per: why it failed
                lines.append(f"| {k} | failed: {per} | - | {ms['after'][k]:.1f} | {s.stages[k].epochs * ipe} |")
                continue
            lines.append(f"| {k} | {first:.1f} | {per:.1f} | {ms['after'][k]:.1f} | {s.stages[k].epochs * ipe} |")
        lines.append("")
    lines += ["## torch.profiler key_averages, one iteration", ""]
    for k, name, table in profiles:
        lines += [f"Stage {k}, {name}:", "", "```", table.rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
