#!/usr/bin/env python
"""Robustness check: every class of bad input and fault, run through the real CLI.

Each case runs ``python -m pgps_tune.cli ...`` in its own process, on tiny data this
script writes itself, with an isolated cache and results store, and is judged on what a
user sees: the exit code, the line that says what happened (the last ``pgps-tune:`` line,
else the last line printed), the absence of a traceback, and a check of what is left on
disk (nothing run from a crafted file, nothing half-written, nothing lost).  The report
(``docs/ROBUSTNESS.md`` by default) lists case, command, exit code, that line and verdict,
each class once and in class order (the cases run in the order their shared setup needs):

1. untrusted files  2. interrupts  3. divergence and bad values  4. numbers
5. no traceback  6. files and folders  7. cluster faults  8. packaging  9. layering
10. data and flags read wrongly before

    .venv/bin/python scripts/robustness.py --report docs/ROBUSTNESS.md

It takes a few minutes on 2 CPU cores; ``--only CLASS`` runs one class (e.g. ``--only 4``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = ["--preset", "constant", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2",
            "--filters", "4", "8", "16"]
QUIET_CPU = ["--quiet", "--device", "cpu", "--threads", "1"]
TINY_TRAIN = [*TINY_NET, "--iterations-per-epoch", "2", *QUIET_CPU]
EXIT = {"ok": 0, "user": 2, "sigint": 130, "sigterm": 143}


@dataclass
class Case:
    klass: str
    name: str
    argv: list[str]  # CLI arguments; "{w}" is replaced by the case's workspace
    expect_rc: int
    expect: str = ""  # substring (case-insensitive) of the last line printed on stderr (or stdout)
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, subprocess.CompletedProcess], str | None] | None = None  # None: ok, else why not
    interrupt: tuple[int, Callable[[Path], bool]] | None = None  # (signal, ready-to-send predicate)
    env: dict[str, str] = field(default_factory=dict)
    preexec: Callable[[], None] | None = None
    timeout: float = 300.0


@dataclass
class Outcome:
    case: Case
    command: str
    rc: int | None
    last: str
    verdict: str
    why: str = ""
    seconds: float = 0.0


# -- tiny data -------------------------------------------------------------------------------


def write_msd(root: Path, n: int = 6, shape=(24, 24, 20), nan_case: int | None = None,
              image_path: str | None = None) -> Path:
    """A tiny MSD-layout dataset: noisy volumes with two labelled blobs."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        rng = np.random.default_rng(i)
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
        label = np.zeros(shape, np.uint8)
        for cls in (1, 2):
            centre = rng.uniform(0.3, 0.7, 3) * np.array(shape)
            label[np.linalg.norm(grid - centre, axis=-1) < min(shape) / 5] = cls
        image = (label + rng.normal(0, 0.3, shape)).astype(np.float32)
        if i == nan_case:
            image[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    if image_path is not None:
        training[0]["image"] = image_path
    (root / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": n, "training": training}))
    return root


SPACE = {
    "name": "robust",
    "parameters": {"stages": {"type": "int", "low": 1, "high": 2},
                   "growth": {"type": "float", "low": 1.5, "high": 2.0, "when": "stages > 1"},
                   "mode": {"value": "resource"}},
    "objective": {"type": "max_dice"},
    "search": {"algorithm": "random", "num_samples": 2, "seed": 0},
    "asha": {"time_attr": "baseline_iterations", "grace_fraction": 0.5, "reduction_factor": 2},
    "confirm": {"enabled": False},  # the cases here are about input and faults, not about confirming winners
    "budget": {"epochs": 10, "iterations_per_epoch": 3, "batch_size": 2, "filters": [4, 8, 16], "optimizer": "adamw",
               "lr": 0.003, "val_every": 2, "synthetic_cases": 4, "synthetic_shape": [24, 24, 24],
               "final_patch": [16, 16, 16], "pools": [2, 2, 2], "max_failures": 1},
}


def write_space(path: Path, **over) -> Path:
    import yaml

    raw = json.loads(json.dumps(SPACE))
    for k, v in over.items():
        if isinstance(v, dict) and k != "parameters":
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    path.write_text(yaml.safe_dump(raw))
    return path


# -- checks --------------------------------------------------------------------------------


def absent(*names: str):
    def check(w: Path, r) -> str | None:
        there = [n for n in names if (w / n).exists()]
        return f"{there} exist" if there else None
    return check


def present(*names: str):
    def check(w: Path, r) -> str | None:
        gone = [n for n in names if not (w / n).exists()]
        return f"{gone} missing" if gone else None
    return check


def both(*checks):
    def check(w: Path, r) -> str | None:
        for c in checks:
            why = c(w, r)
            if why:
                return why
        return None
    return check


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but lock files (which name their latest holder)."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def snapshot(w: Path, sub: str) -> None:
    """Record what ``w/sub`` holds now, for :func:`unchanged` (call it last in a setup)."""
    (w / f"{sub}.kept.json").write_text(json.dumps(tree_hashes(w / sub)))


def unchanged(sub: str):
    def check(w: Path, r) -> str | None:
        kept, now = json.loads((w / f"{sub}.kept.json").read_text()), tree_hashes(w / sub)
        changed = sorted(k for k in kept.keys() | now.keys() if kept.get(k) != now.get(k))
        return f"{sub} changed: {changed[:5]}" if changed else None
    return check


def crafted_pickle(path: Path, marker: Path) -> None:
    """A torch-loadable file whose unpickling would create ``marker`` (if it were allowed to run code)."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"identity": {}, "model": Evil()}, path)


def strict_json(*names: str):
    def check(w: Path, r) -> str | None:
        for n in names:
            for p in w.glob(n):
                try:
                    json.loads(p.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
                except ValueError as exc:
                    return f"{p.name} is not strict JSON ({exc})"
        return None
    return check


# -- running -----------------------------------------------------------------------------------


def run_case(case: Case, base: Path, python: str) -> Outcome:
    w = base / f"{case.klass.split()[0]}-{case.name.replace(' ', '_')[:40]}"
    w.mkdir(parents=True)
    env = {**os.environ, "PGPS_CACHE_DIR": str(base / "cache"), "PGPS_RESULTS_DIR": str(w / "store"),
           "PYTHONUNBUFFERED": "1", **{k: v.replace("{w}", str(w)) for k, v in case.env.items()}}
    argv = [a.replace("{w}", str(w)) for a in case.argv]
    command = "pgps-tune " + " ".join(a.replace(str(w), "W").replace(str(base), "B") for a in argv)
    t0 = time.time()
    try:
        if case.setup:
            case.setup(w)
    except Exception as exc:  # the script's own preparation failed: say so, and go on with the other cases
        return Outcome(case, command, None, "", "FAIL", f"setup failed: {type(exc).__name__}: {exc}"[:300],
                       time.time() - t0)
    try:
        proc = subprocess.Popen([python, "-m", "pgps_tune.cli", *argv], cwd=w, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=case.preexec)
        if case.interrupt:
            sig, ready = case.interrupt
            while proc.poll() is None and time.time() - t0 < case.timeout and not ready(w):
                time.sleep(0.2)
            if proc.poll() is None:
                proc.send_signal(sig)
        out, err = proc.communicate(timeout=max(10.0, case.timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Outcome(case, command, None, "", "FAIL", "timed out", time.time() - t0)
    r = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    last = what_happened(out, err, r.returncode)
    why = []
    if r.returncode != case.expect_rc:
        why.append(f"exit {r.returncode}, expected {case.expect_rc}")
    if "Traceback" in err or "Traceback" in out:
        why.append("traceback printed")
    if case.expect and case.expect.lower() not in last.lower():
        why.append(f"last line lacks {case.expect!r}")
    if case.check:
        extra = case.check(w, r)
        if extra:
            why.append(extra)
    shown = last.replace(str(w), "W").replace(str(base), "B")  # as the command is shown
    return Outcome(case, command, r.returncode, shown, "FAIL" if why else "ok", "; ".join(why), time.time() - t0)


def what_happened(out: str, err: str, rc: int | None) -> str:
    """The line of a command's output that says what happened, shown as the report's "last line" and judged
    against a case's ``expect``: the last ``pgps-tune:`` line on stderr (an error, an interruption and how
    to resume, a note), else the last non-empty line of stdout for a command that succeeded (a JSON document
    shown whole, in one line) or of stderr for one that failed; library warnings (``optuna_warn(``), an
    echoed command line or a closing ``}`` never say what happened."""
    err_lines = [ln for ln in err.splitlines() if ln.strip()]
    ours = [ln for ln in err_lines if ln.startswith("pgps-tune:")]
    if ours:
        return ours[-1]
    if rc == 0 and out.strip():
        try:
            return json.dumps(json.loads(out))
        except ValueError:
            return out.strip().splitlines()[-1]
    lines = err_lines or [ln for ln in out.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def first_report(phase: str = "search"):
    """Ready once a trial of ``phase`` saved a checkpoint (not merely wrote a result line)."""
    def ready(w: Path) -> bool:
        return any((w / "sweep" / "ray").glob(f"*-{phase}/*/checkpoint_*"))
    return ready


def checkpoint_exists(run: str):
    def ready(w: Path) -> bool:
        return (w / run / "checkpoint.pt").is_file()
    return ready


def after(seconds: float):
    def ready(w: Path, t0=[None]) -> bool:  # noqa: B006 - a per-case start time
        t0[0] = t0[0] or time.time()
        return time.time() - t0[0] >= seconds
    return ready


# -- the cases -----------------------------------------------------------------------------------


def cases(base: Path, python: str) -> list[Case]:  # noqa: C901 - a flat list of cases
    data = base / "tiny"
    trained = base / "trained"
    train = ["train", "--data", str(data), "--out", "{w}/run", "--epochs", "2", *TINY_TRAIN]
    sweep = ["tune", "--space", "{w}/space.yaml", "--data", "synthetic", "--out", "{w}/sweep", "--quiet",
             "--cpus-per-trial", "1", "--max-concurrent", "1"]

    def copy_run(w: Path) -> None:
        shutil.copytree(trained, w / "run")

    def space(**over):
        return lambda w: write_space(w / "space.yaml", **over)

    def space_text(text: str):
        return lambda w: (w / "space.yaml").write_text(text)

    def resume_train(extra=()):
        # the same flags as the run in B/trained, which stopped after its first epoch: resuming trains on
        return ["train", "--data", str(data), "--out", "{w}/run", "--epochs", "6", *TINY_TRAIN, "--resume", *extra]

    out: list[Case] = []
    add = out.append
    U, INT, D, N, T, F, C, P, L, R = ("1 untrusted files", "2 interrupts", "3 divergence and bad values",
                                    "4 numbers", "5 no traceback", "6 files and folders", "7 cluster faults",
                                    "8 packaging", "9 layering", "10 data and flags read wrongly before")

    holders: dict[Path, subprocess.Popen] = {}

    def hold_lock(w: Path, folder: Path, name: str) -> None:
        """Another command holds ``folder``'s lock ``name`` (as a running train or tune does): a process that
        takes it with the same lock as the CLI (a sweep's through the tuner's own ``sweep_lock``, which names
        its holder ``pgps-tune tune``) and sleeps; :func:`release` ends it."""
        take = ("from pgps_tune.tuner import sweep_lock as take\nlock = take(Path(sys.argv[1]))\n"
                if name == ".pgps-sweep.lock" else "from pgps_tune.errors import folder_lock\n"
                "lock = folder_lock(Path(sys.argv[1]), sys.argv[2], 'held', lambda: False)\n")
        code = ("import sys, time\nfrom pathlib import Path\n" + take +
                "with lock:\n    print('held', flush=True)\n    time.sleep(600)\n")
        holders[w] = subprocess.Popen([python, "-c", code, str(folder), name], stdout=subprocess.PIPE, text=True)
        holders[w].stdout.readline()  # the lock is held

    def release(w: Path) -> bool:
        """End the holder of :func:`hold_lock`; whether it was still alive (undisturbed by the case)."""
        holder = holders.pop(w)
        alive = holder.poll() is None
        holder.kill()
        holder.wait()
        return alive

    def train_running(w: Path) -> None:
        hold_lock(w, w / "run", ".pgps-train.lock")

    def train_undisturbed(w: Path, r) -> str | None:
        alive = release(w)
        trained = (w / "run" / "checkpoint.pt").exists()
        return None if alive and not trained else f"holder alive: {alive}; the refused command trained: {trained}"

    # a finished tiny sweep (2 random trials, no references, no ASHA: about 30 s), run once, by the first case
    # that needs it; those cases work on copies of it and check that it is left as it was
    finished_space, original = base / "finished.yaml", base / "finished" / "sweep"
    original_hashes: dict[str, str] = {}
    resume_finished = ["tune", "--space", str(finished_space), "--data", "synthetic", "--out", "{w}/sweep", "--quiet",
                       "--cpus-per-trial", "1", "--max-concurrent", "1", "--resume"]

    def finished_copy(dest: Path) -> Path:
        if not original_hashes:
            write_space(finished_space, search={"num_samples": 2, "references": False}, asha={"enabled": False})
            env = {**os.environ, "PGPS_CACHE_DIR": str(base / "cache"),
                   "PGPS_RESULTS_DIR": str(base / "finished" / "store")}
            argv = [a.replace("{w}/sweep", str(original)) for a in resume_finished[:-1]]
            subprocess.run([python, "-m", "pgps_tune.cli", *argv], check=True, env=env, cwd=base, capture_output=True,
                           timeout=600)
            original_hashes.update(tree_hashes(original))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(original, dest, symlinks=True)
        return dest

    def original_untouched(w: Path, r) -> str | None:
        now = tree_hashes(original)
        changed = sorted(k for k in now.keys() | original_hashes.keys() if now.get(k) != original_hashes.get(k))
        return f"the original sweep B/finished/sweep changed: {changed[:5]}" if changed else None

    def copied_sweep(edit: Callable[[Path], None] | None = None):
        """Setup: a copy of the finished sweep in W/sweep, edited by ``edit``, then recorded for unchanged()."""
        def setup(w: Path) -> None:
            finished_copy(w / "sweep")
            if edit:
                edit(w)
            snapshot(w, "sweep")
        return setup

    def two_channel_files(w: Path) -> None:
        copy_run(w)
        (w / "in").mkdir()
        for case in ("c", "d"):
            for ch in ("0000", "0001"):
                nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), w / "in" / f"{case}_{ch}.nii.gz")

    # 1. untrusted files never run code
    def evil_run(w: Path) -> None:
        copy_run(w)
        crafted_pickle(w / "run" / "checkpoint.pt", w / "PWNED")

    add(Case(U, "crafted checkpoint, train --resume", resume_train(), 2, "checkpoint", evil_run, absent("PWNED")))
    add(Case(U, "crafted checkpoint, evaluate", ["evaluate", "--data", str(data), "--run", "{w}/run",
                                                 "--device", "cpu"], 2, "checkpoint", evil_run, absent("PWNED")))

    def evil_store(w: Path) -> None:
        (w / "store" / "dataset=Tiny" / "sweep=x").mkdir(parents=True)
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {w / 'PWNED'}",))
        (w / "store" / "dataset=Tiny" / "sweep=x" / "part-0.parquet").write_bytes(pickle.dumps(Evil()))

    add(Case(U, "pickle posing as a results-store parquet", ["best", "--dataset", "Tiny"], 2, "", evil_store,
             absent("PWNED")))
    deep = "[" * 100_000 + "]" * 100_000  # a few hundred KiB; Python's parser recurses per level

    def deep_store(w: Path) -> None:  # a readable store table whose JSON cell is nested 100,000 levels deep
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pgps_tune.results import SCHEMA

        folder = w / "store" / "dataset=Tiny" / "sweep=x"
        folder.mkdir(parents=True)
        row = {**{n: None for n in SCHEMA.names}, "trial_id": "t1", "completed": True, "params": deep}
        table = pa.Table.from_pylist([row], schema=SCHEMA).append_column("objective", pa.array(["max_dice"]))
        pq.write_table(table.append_column("final_patch", pa.array(["[16, 16, 16]"])), folder / "part-0.parquet")

    add(Case(U, "dataset.json nested 100,000 levels deep", ["plan", "--data", "{w}/deep"], 2, "nested too deeply",
             lambda w: (write_msd(w / "deep", n=3) / "dataset.json").write_text(deep)))
    add(Case(U, "results-store cell nested 100,000 levels deep", ["best", "--dataset", "Tiny"], 2,
             "nested too deeply", deep_store))

    def evil_cache(w: Path) -> None:
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {w / 'PWNED'}",))

        shutil.copytree(base / "cache", w / "cache")
        victim = next((w / "cache").glob("Tiny-*/00000_img.npy"))
        np.save(victim, np.array([Evil()], dtype=object), allow_pickle=True)

    add(Case(U, "pickled object array as a cached volume", ["plan", "--data", str(data), "--cache-dir", "{w}/cache"],
             0, "", evil_cache, absent("PWNED")))

    predict = ["predict", "--run", "{w}/run", "--out", "{w}/seg", "--device", "cpu", "--quiet", "--input"]

    def detached_mha(w: Path) -> None:  # an .mha header whose voxels are "in" a file of someone else's
        copy_run(w)
        (w / "in").mkdir()
        (w / "in" / "case.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
                                          "ElementDataFile = /etc/hostname\n")

    add(Case(U, "image naming a data file outside its folder (.mha), predict", [*predict, "{w}/in/case.mha"], 2,
             "outside the image's own folder", detached_mha, absent("seg")))

    def broken_mha(w: Path) -> None:  # a header MetaImage's parser gives up on, printing its own lines to fd 2
        copy_run(w)
        (w / "in").mkdir()
        (w / "in" / "case.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 8 x 8\nElementType = MET_UCHAR\n"
                                            b"ElementDataFile = LOCAL\n" + bytes(512))

    def one_stderr_line(w: Path, r) -> str | None:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        return None if len(lines) == 1 else f"{len(lines)} lines on stderr: {lines[:3]}"

    add(Case(U, "image with a header ITK cannot parse (.mha), predict", [*predict, "{w}/in/case.mha"], 2,
             "cannot read MetaImage file", broken_mha, both(absent("seg"), one_stderr_line)))

    def extension_bomb(w: Path) -> None:  # a NIfTI header claiming a 1 GiB extension, a few hundred bytes on disk
        import gzip

        copy_run(w)
        (w / "in").mkdir()
        raw = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)).to_bytes()
        head = bytearray(raw[:348])
        head[108:112] = np.float32(348 + 4 + 16).tobytes()
        bomb = bytes(head) + b"\1\0\0\0" + np.int32([1 << 30, 6]).tobytes() + bytes(8) + raw[352:]
        (w / "in" / "case.nii.gz").write_bytes(gzip.compress(bomb))

    add(Case(U, "NIfTI header extension claiming 1 GiB, predict", [*predict, "{w}/in/case.nii.gz"], 2,
             "MiB of NIfTI header extensions", extension_bomb, absent("seg")))

    def parquet_bomb(w: Path) -> None:  # one 10 KB value on 200,000 rows: a few KiB on disk, 2 GB decoded
        import pyarrow as pa
        import pyarrow.parquet as pq

        sweep = finished_copy(w / "sweep")
        one = pq.read_table(sweep / "trials.parquet").slice(0, 1)
        cells = {c: pa.DictionaryArray.from_arrays(pa.array([0] * 200_000, pa.int32()),
                                                   pa.array(["x" * 10_000 if c == "error" else one[c][0].as_py()]))
                 if pa.types.is_string(one[c].type) else pa.array([one[c][0].as_py()] * 200_000, one[c].type)
                 for c in one.schema.names}
        pq.write_table(pa.table(cells), sweep / "trials.parquet", store_schema=False, compression="zstd")

    add(Case(U, "trials.parquet of a few KiB decoding to 2 GB, trials", ["trials", "{w}/sweep"], 2,
             "decodes to more than", parquet_bomb, original_untouched))

    def page_bomb(w: Path) -> None:  # a page header claiming 1.9 GiB, filled by 64 KiB of zstd frames
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = finished_copy(w / "sweep") / "trials.parquet"
        one = pq.read_table(path).slice(0, 1)
        col = one.schema.get_field_index("error")  # a page of 200 KB of noise, room for the frames
        pq.write_table(one.set_column(col, "error", pa.array([os.urandom(100_000).hex()])), path,
                       use_dictionary=False, compression="zstd")
        chunk = pq.ParquetFile(path).metadata.row_group(0).column(col)
        data = path.read_bytes()
        start, end = chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size
        body = data.index(b"\x28\xb5\x2f\xfd", start)  # the page's zstd frame follows its header
        raw = pa.decompress(data[body:end], chunk.total_uncompressed_size - (body - start), codec="zstd",
                            asbytes=True)
        plain = raw[:4 + int.from_bytes(raw[:4], "little")] + (4).to_bytes(4, "little") + b"boom"  # levels, value
        frames = (pa.compress(plain, codec="zstd", asbytes=True)
                  + pa.compress(bytes(64 << 20), codec="zstd", asbytes=True) * 31)  # the value, then 1.9 GiB of zeros

        def i32(n: int) -> bytes:  # a Thrift compact i32 field (the next field id) holding n >= 0
            out, n = bytearray(b"\x15"), 2 * n
            while n >= 0x80:
                out.append(n & 0x7F | 0x80)
                n >>= 7
            return bytes(out + bytes([n]))

        def header(packed: int) -> bytes:  # a DATA_PAGE of 1 value (PLAIN, RLE levels) and its sizes; no statistics
            return (i32(0) + i32(len(plain) + 31 * (64 << 20)) + i32(packed) + b"\x2c"
                    + i32(1) + i32(0) + i32(3) + i32(3) + b"\0\0")

        packed = end - start - len(header(end - start))
        skip = packed - len(frames) - 8  # a skippable zstd frame fills the rest of the page
        page = header(packed) + frames + (0x184D2A50).to_bytes(4, "little") + skip.to_bytes(4, "little") + bytes(skip)
        assert skip >= 0 and len(page) == end - start
        path.write_bytes(data[:start] + page + data[end:])

    add(Case(U, "trials.parquet page header claiming 1.9 GiB, trials", ["trials", "{w}/sweep"], 2,
             "has pages that decompress to more than", page_bomb, original_untouched))

    def evil_properties(w: Path) -> None:
        """A preprocessed nnU-Net dataset as nnU-Net's preprocessing leaves it, reduced to what nnunet-train reads
        before it trains (plans, dataset.json, a label file, the 3d_fullres folder), with a properties .pkl whose
        unpickling would run os.system: nothing of nnU-Net's planning or training runs."""
        pre = w / "pre" / "Dataset990_Tiny"
        (pre / "gt_segmentations").mkdir(parents=True)
        (pre / "nnUNetPlans_3d_fullres").mkdir()
        for folder in ("raw", "results"):
            (w / folder).mkdir()
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), pre / "gt_segmentations" / "c.nii.gz")
        (pre / "nnUNetPlans.json").write_text(json.dumps({
            "dataset_name": "Dataset990_Tiny", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [16, 16, 16],
                "spacing": [1.0, 1.0, 1.0], "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {
                    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]}}}}}))
        (pre / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {
            "background": 0, "a": 1}, "numTraining": 1, "file_ending": ".nii.gz"}))
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {w / 'PWNED'}",))
        (pre / "nnUNetPlans_3d_fullres" / "c.pkl").write_bytes(pickle.dumps(Evil()))

    if importlib.util.find_spec("nnunetv2"):  # the nnunet extra; without it nnunet-train stops before any file
        add(Case(U, "crafted nnU-Net properties .pkl, nnunet-train", [
            "nnunet-train", "990", "3d_fullres", "0", "--schedule", "{w}/s.yaml", "--device", "cpu"], 2,
            "it asks for posix.system", evil_properties, absent("PWNED"), timeout=120,
            env={"nnUNet_preprocessed": "{w}/pre", "nnUNet_raw": "{w}/raw", "nnUNet_results": "{w}/results"}))

    # 2. interrupts
    def resume_command_follows(w: Path, r) -> str | None:  # the line after "resume with:" is the command
        tail = (r.stderr.strip().splitlines() or [""])[-1]
        return None if " tune " in tail and tail.endswith(" --resume") else f"no command to resume after it: {tail!r}"

    add(Case(INT, "SIGINT during tune, then no export", sweep, 130, "resume with:", space(),
             both(absent("sweep/trials.parquet", "sweep/best_schedule.yaml", "sweep/summary.json", "store"),
                  resume_command_follows), interrupt=(signal.SIGINT, first_report())))
    add(Case(INT, "SIGTERM during tune", sweep, 143, "resume with:", space(),
             both(absent("sweep/trials.parquet", "sweep/best_schedule.yaml"), resume_command_follows),
             interrupt=(signal.SIGTERM, first_report("references"))))

    def interrupted_sweep(w: Path) -> None:
        env = {**os.environ, "PGPS_CACHE_DIR": str(base / "cache"), "PGPS_RESULTS_DIR": str(w / "store")}
        write_space(w / "space.yaml")
        argv = [a.replace("{w}", str(w)) for a in sweep]
        proc = subprocess.Popen([python, "-m", "pgps_tune.cli", *argv], cwd=w, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while proc.poll() is None and not first_report()(w) and time.time() - t0 < 240:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)

    def all_trials_once(w: Path, r) -> str | None:
        import pyarrow.parquet as pq

        p = w / "sweep" / "trials.parquet"
        if not p.is_file():
            return "no trials.parquet after --resume"
        rows = pq.read_table(p).to_pylist()
        ids = [x["trial_id"] for x in rows]
        if len(ids) != 4 or len(set(ids)) != 4 or not all(x["completed"] for x in rows):
            return f"trials after resume: {[(x['trial_id'], x['status']) for x in rows]}"
        return None

    add(Case(INT, "--resume after SIGINT completes every trial once", [*sweep, "--resume"], 0, "", interrupted_sweep,
             all_trials_once))

    def crafted_sweep(w: Path) -> None:
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {w / 'PWNED'}",))

        interrupted_sweep(w)
        for state in (w / "sweep" / "ray").glob("*/tuner.pkl"):
            state.write_bytes(pickle.dumps(Evil()))

    add(Case(U, "crafted tuner.pkl in a sweep, tune --resume", [*sweep, "--resume"], 2, "refused to resume",
             crafted_sweep, absent("PWNED")))

    def failed_trial_errors(w: Path) -> None:
        """Tune's error.pkl of a trial that raised (its class built from code as cloudpickle loads it), and a
        crafted one, in two trial folders of a finished sweep."""
        import pickle

        from ray import cloudpickle
        from ray.exceptions import RayTaskError

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {w / 'PWNED'}",))

        finished_copy(w / "sweep")
        trials = sorted(p for p in (w / "sweep" / "ray").glob("*/run_trial_*") if p.is_dir())
        raised = RayTaskError("run_trial", "Traceback ...", RuntimeError("boom")).as_instanceof_cause()
        (trials[0] / "error.pkl").write_bytes(cloudpickle.dumps(raised))
        (trials[-1] / "error.pkl").write_bytes(pickle.dumps(Evil()))

    add(Case(U, "failed trial's error.pkl (and a crafted one), tune --resume", resume_finished, 0, "",
             failed_trial_errors, absent("PWNED"), timeout=600))

    def no_resume_hint(w: Path, r) -> str | None:
        return "suggests --resume with no checkpoint" if "--resume" in r.stderr else None

    add(Case(INT, "SIGINT during train before the first checkpoint",
             ["train", "--data", str(data), "--out", "{w}/run", "--epochs", "2", *TINY_NET,
              "--iterations-per-epoch", "100000", *QUIET_CPU], 130, "",
             check=no_resume_hint, interrupt=(signal.SIGINT, after(8))))
    add(Case(INT, "SIGINT during train after a checkpoint",
             ["train", "--data", str(data), "--out", "{w}/run", "--epochs", "1000", *TINY_TRAIN], 130, "--resume",
             interrupt=(signal.SIGINT, checkpoint_exists("run"))))
    add(Case(INT, "SIGTERM during train after a checkpoint",
             ["train", "--data", str(data), "--out", "{w}/run", "--epochs", "1000", *TINY_TRAIN], 143, "--resume",
             interrupt=(signal.SIGTERM, checkpoint_exists("run"))))

    add(Case(INT, "tune --resume of a finished sweep with another budget (--epochs 12)",
             [*resume_finished, "--epochs", "12"], 2, "(budget.epochs: 10 then, 12 now)", copied_sweep(),
             both(unchanged("sweep"), original_untouched), timeout=600))

    def cut_journal(w: Path) -> None:  # as a kill during a write of the study, or a copy cut short, leaves it
        journal = w / "sweep" / "optuna.journal"
        journal.write_bytes(journal.read_bytes()[: journal.stat().st_size // 2])

    add(Case(INT, "tune --resume with a damaged optuna.journal", resume_finished, 2,
             "optuna.journal is damaged (its last line is cut short)", copied_sweep(cut_journal),
             both(unchanged("sweep"), original_untouched), timeout=600))

    def killed_prepare(w: Path) -> None:
        write_msd(w / "big", n=12, shape=(64, 64, 48))
        env = {**os.environ, "PGPS_CACHE_DIR": str(w / "cache")}
        proc = subprocess.Popen([python, "-m", "pgps_tune.cli", "plan", "--data", str(w / "big")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while time.time() - t0 < 60 and not any(p.name.startswith(".") and p.is_dir() for p in (w / "cache").glob("*")):
            time.sleep(0.05)
        proc.kill()
        proc.wait()

    def no_temp_left(w: Path, r) -> str | None:
        left = [p.name for p in (w / "cache").iterdir() if p.name.startswith(".") and p.is_dir()]
        return f"temp folders left: {left}" if left else None

    add(Case(INT, "SIGKILL during preprocessing, then rerun", ["plan", "--data", "{w}/big", "--cache-dir", "{w}/cache"],
             0, "", killed_prepare, no_temp_left))

    # 3. divergence and bad values
    def nan_loss(w: Path) -> None:  # every training loss becomes NaN, as a diverging run's does
        (w / "inject").mkdir(exist_ok=True)
        (w / "inject" / "sitecustomize.py").write_text(
            "import monai.losses\n"
            "monai.losses.DiceCELoss.forward = lambda self, x, y: (x * float('nan')).mean()\n")

    nan_loss_env = {"PYTHONPATH": f"{{w}}/inject:{ROOT}"}
    add(Case(D, "a non-finite loss stops train", train, 2, "diverged", nan_loss, absent("run"), env=nan_loss_env))

    def nan_data(w: Path) -> None:
        write_msd(w / "nan", n=3, nan_case=1)

    add(Case(D, "NaN voxel in a dataset", ["plan", "--data", "{w}/nan", "--cache-dir", "{w}/cache"], 2, "case_001",
             nan_data))

    def resave(path: Path, voxels: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
        old = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(old.dataobj) if voxels is None else voxels,
                                 old.affine if affine is None else affine), path)

    plan_odd = ["plan", "--data", "{w}/odd", "--cache-dir", "{w}/cache"]
    add(Case(D, "a label whose header is mirrored against its voxels", plan_odd, 2, "not on its image's voxel grid",
             lambda w: resave(write_msd(w / "odd", n=3) / "labelsTr" / "case_001.nii.gz",
                              affine=np.diag([-1.0, 1.0, 1.0, 1.0]))))
    add(Case(D, "label maps without any foreground", plan_odd, 2, "foreground",
             lambda w: [resave(p, voxels=np.zeros(nib.load(p).shape, np.uint8))
                        for p in (write_msd(w / "odd", n=3) / "labelsTr").glob("*.nii.gz")]))
    add(Case(D, "an image with no voxels", plan_odd, 2, "holds no voxels",
             lambda w: resave(write_msd(w / "odd", n=3) / "imagesTr" / "case_002.nii.gz",
                              voxels=np.zeros((0, 24, 20), np.float32))))
    def inflating(path: Path) -> None:  # a header declaring 4000^3 bytes (60 GiB) over a short run of zeros
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((4000, 4000, 4000))
        hdr.set_data_dtype(np.uint8)
        with gzip.open(path, "wb") as fh:  # a real bomb holds the 60 GiB of zeros (about 60 MiB gzipped)
            fh.write(hdr.binaryblock + b"\0" * 4 + bytes(1 << 20))

    add(Case(D, "an image whose header declares 60 GiB (a compressed zero bomb)", plan_odd, 2,
             "more than the", lambda w: inflating(write_msd(w / "odd", n=3) / "imagesTr" / "case_002.nii.gz")))

    def short(path: Path) -> None:  # a header declaring 2 GB (under the memory check) over 1 MiB of zeros
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((2000, 1000, 1000))
        hdr.set_data_dtype(np.uint8)
        hdr["vox_offset"] = 352
        path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + bytes(1 << 20)))

    add(Case(D, "an image holding 1 MiB where its header declares 2 GB, refused before allocating", plan_odd, 2,
             "fewer than the 2,000,000,352 its header declares",
             lambda w: short(write_msd(w / "odd", n=3) / "imagesTr" / "case_002.nii.gz")))

    def vector(path: Path) -> None:  # as ITK writes several components per voxel: X Y Z 1 C
        img = nib.Nifti1Image(np.asarray(nib.load(path).dataobj)[..., None, None], np.eye(4))
        img.header.set_intent("vector")
        nib.save(img, path)

    add(Case(D, "a NIfTI vector image (X Y Z 1 C) is read as channels", plan_odd, 0, '"cases": 3',
             lambda w: vector(write_msd(w / "odd", n=3) / "imagesTr" / "case_002.nii.gz")))

    def near_one(path: Path) -> None:  # a label map written as float32 after some arithmetic
        label = np.asarray(nib.load(path).dataobj)
        resave(path, voxels=np.where(label == 1, np.float32(0.9999999), label).astype(np.float32))

    add(Case(D, "a float label map with 0.9999999 for 1 is read as 1, with a warning", plan_odd, 0,
             "near integers (e.g. 0.9999999)",
             lambda w: near_one(write_msd(w / "odd", n=3) / "labelsTr" / "case_001.nii.gz")))
    add(Case(D, "diverging trials in a sweep are failed, not scored or retried", sweep, 2, "no trial completed",
             lambda w: (space()(w), nan_loss(w)), lambda w, r: _diverged_trials(w), env=nan_loss_env))
    add(Case(D, "metrics.json is strict JSON", train, 0, "", check=strict_json("run/metrics.json")))

    # 4. numbers
    bad_flags = [
        ("--workers -1", ["--workers", "-1"], "--workers"), ("--threads 0", ["--threads", "0"], "--threads"),
        ("--lr nan", ["--lr", "nan"], "--lr"), ("--lr -1", ["--lr", "-1"], "--lr"),
        ("--lr inf", ["--lr", "inf"], "--lr"), ("--epochs 0", ["--epochs", "0"], "--epochs"),
        ("--iterations-per-epoch 0", ["--iterations-per-epoch", "0"], "--iterations-per-epoch"),
        ("--fg-ratio 2", ["--fg-ratio", "2"], "--fg-ratio"), ("--val-fraction 1", ["--val-fraction", "1"],
                                                             "--val-fraction"),
        ("--batch-size 1e9", ["--batch-size", "1000000000"], "--batch-size"),
        ("--batch-size 200000 (memory estimate)", ["--batch-size", "200000"], "GiB"),
        ("--batch-size 0", ["--batch-size", "0"], "--batch-size"),
        ("--max-train-seconds -5", ["--max-train-seconds", "-5"], "--max-train-seconds"),
        ("--val-every 0", ["--val-every", "0"], "--val-every"),
        ("--filters 0 8 16", ["--filters", "0", "8", "16"], "--filters"),
        ("--seed -1", ["--seed", "-1"], "--seed"),
    ]
    for name, flag, needle in bad_flags:
        add(Case(N, f"train {name}", [*train, *flag], 2, needle, check=absent("run")))
    add(Case(N, "plan --voxel-budget -1", ["plan", "--data", str(data), "--voxel-budget", "-1"], 2, "--voxel-budget",
             timeout=60))
    add(Case(N, "schedule --final-patch 0 16 16", ["schedule", "--final-patch", "0", "16", "16", "--pools", "2", "2",
                                                   "2"], 2, "final"))
    add(Case(N, "schedule --growth inf", ["schedule", "--preset", "parametric", "--final-patch", "16", "16", "16",
                                          "--pools", "2", "2", "2", "--growth", "inf"], 2, "--growth"))
    add(Case(N, "schedule --out a FIFO", ["schedule", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2",
                                          "--out", "{w}/pipe"], 2, "not a regular file",
             lambda w: os.mkfifo(w / "pipe"), lambda w, r: None if stat.S_ISFIFO((w / "pipe").stat().st_mode)
             else "the FIFO was replaced", timeout=60))
    add(Case(N, "schedule --epochs 10**12", ["schedule", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2",
                                             "--epochs", "1000000000000"], 2, "--epochs", timeout=60))
    for name, flag, needle in [("--num-samples 0", ["--num-samples", "0"], "--num-samples"),
                               ("--num-samples -1", ["--num-samples", "-1"], "--num-samples"),
                               ("--cpus-per-trial nan", ["--cpus-per-trial", "nan"], "--cpus-per-trial"),
                               ("--max-concurrent 0", ["--max-concurrent", "0"], "--max-concurrent"),
                               ("--max-failures -1", ["--max-failures", "-1"], "--max-failures")]:
        add(Case(N, f"tune {name}", [*sweep, *flag], 2, needle, space(), absent("sweep"), timeout=60))
    bad_spaces = [
        ("step 0.5 on an int parameter", {"parameters": {"stages": {"type": "int", "low": 1, "high": 3,
                                                                    "step": 0.5}}}, "step"),
        ("condition against a non-number", {"parameters": {"stages": {"type": "int", "low": 1, "high": 3},
                                                           "growth": {"type": "float", "low": 1.5, "high": 2,
                                                                      "when": "stages > abc"}}}, "abc"),
        ("infinite bound", {"parameters": {"stages": {"type": "int", "low": 1, "high": 3},
                                           "growth": {"type": "float", "low": 1.5, "high": float("inf"),
                                                      "when": "stages > 1"}}}, "growth"),
        ("budget.epochs -3", {"budget": {**SPACE["budget"], "epochs": -3}}, "epochs"),
        ("budget.lr nan", {"budget": {**SPACE["budget"], "lr": float("nan")}}, "lr"),
        ("search.num_samples 10**9", {"search": {"num_samples": 10**9}}, "num_samples"),
        ("asha.grace_fraction 0", {"asha": {"grace_fraction": 0}}, "grace_fraction"),
    ]
    for name, over, needle in bad_spaces:
        add(Case(N, f"space: {name}", sweep, 2, needle, space(**over), absent("sweep"), timeout=60))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    add(Case(N, "space: YAML alias bomb", sweep, 2, "aliases", space_text(bomb + "parameters: *i\n"), timeout=20))
    add(Case(N, "space: 50 MB YAML", sweep, 2, "larger than", space_text("# " + "x" * (50 * 2**20) + "\n"),
             timeout=20))
    add(Case(N, "schedule file with a negative batch",
             ["schedule", "--from", "{w}/s.yaml"], 2, "batch",
             lambda w: (w / "s.yaml").write_text("final_patch: [16, 16, 16]\npools: [2, 2, 2]\nbaseline_batch_size: 2\n"
                                                 "stages: [{patch_size: [16, 16, 16], batch_size: -4, epochs: 3}]\n")))

    # 5. no traceback for a user error, anywhere
    add(Case(T, "train --out is an existing file", [*train[:4], "{w}/file", *train[5:]], 2, "--out",
             lambda w: (w / "file").write_text("keep me"), lambda w, r: None if (w / "file").read_text() == "keep me"
             else "the file was changed"))
    add(Case(T, "tune --out is an existing file", [*sweep[:6], "{w}/file", *sweep[7:]], 2, "--out",
             lambda w: (space()(w), (w / "file").write_text("x"))))
    add(Case(T, "export --out is an existing file", ["export", "--experiment", "{w}", "--out", "{w}/file"], 2, "",
             lambda w: (w / "file").write_text("x")))

    def foreign_store(w: Path) -> None:
        (w / "store").mkdir()
        (w / "store" / "notes.txt").write_text("not parquet")

    add(Case(T, "results store holding a foreign file", ["best", "--dataset", "Tiny"], 2, "notes.txt",
             foreign_store))
    add(Case(T, "malformed sweep.json", ["export", "--experiment", "{w}/sw", "--out", "{w}/ex"], 2, "sweep.json",
             lambda w: ((w / "sw").mkdir(), (w / "sw" / "sweep.json").write_text("{oops"))))
    add(Case(T, "empty sweep.json", ["export", "--experiment", "{w}/sw", "--out", "{w}/ex"], 2, "sweep.json",
             lambda w: ((w / "sw").mkdir(), (w / "sw" / "sweep.json").write_text(""))))
    add(Case(T, "sweep.json missing keys", ["export", "--experiment", "{w}/sw", "--out", "{w}/ex"], 2, "sweep.json",
             lambda w: ((w / "sw").mkdir(), (w / "sw" / "sweep.json").write_text('{"sweep": "x"}'))))

    def gutted_checkpoint(w: Path) -> None:
        import torch

        copy_run(w)
        ck = torch.load(w / "run" / "checkpoint.pt", weights_only=True)
        ck.pop("model", None)
        torch.save(ck, w / "run" / "checkpoint.pt")

    add(Case(T, "checkpoint missing keys, evaluate", ["evaluate", "--data", str(data), "--run", "{w}/run",
                                                       "--device", "cpu"], 2, "checkpoint", gutted_checkpoint))
    add(Case(T, "checkpoint missing keys, resume", resume_train(), 2, "checkpoint", gutted_checkpoint))

    def full_disk(w: Path) -> None:
        copy_run(w)
        (w / "before.sha").write_text(sha(w / "run" / "checkpoint.pt"))

    def limit_file_size(size: int) -> Callable[[], None]:
        def preexec() -> None:  # the checkpoint no longer fits: like a disk that fills
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        return preexec

    def old_checkpoint_intact(w: Path, r) -> str | None:
        return None if sha(w / "run" / "checkpoint.pt") == (w / "before.sha").read_text() else "checkpoint changed"

    ck_size = (trained / "checkpoint.pt").stat().st_size if (trained / "checkpoint.pt").exists() else 10**6
    add(Case(T, "disk fills while writing a checkpoint", resume_train(), 2, "intact", full_disk, old_checkpoint_intact,
             preexec=limit_file_size(ck_size // 2)))

    def internal_bug(w: Path) -> None:
        (w / "inject").mkdir()
        (w / "inject" / "sitecustomize.py").write_text(
            "import pgps_tune.schedule as s\n"
            "def _boom(*a, **k):\n    raise ZeroDivisionError('a planted bug')\n"
            "s.Schedule.table = _boom\n")

    def names_log(w: Path, r) -> str | None:
        last = (r.stderr.strip().splitlines() or [""])[-1]
        logs = [tok.strip(".;,()") for tok in last.split() if tok.strip(".;,()").endswith(".log")]
        if not logs or not Path(logs[0]).is_file() or "ZeroDivisionError" not in Path(logs[0]).read_text():
            return "the last line names no log file holding the traceback"
        return None

    add(Case(T, "a genuine internal error", ["schedule", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2"],
             1, ".log", internal_bug, names_log, env={"PYTHONPATH": f"{{w}}/inject:{ROOT}"}))

    add(Case(T, "output piped into head -1 (the reader leaves early)", [], 141, ""))  # see special()

    # 6. files and folders
    def group_writable(w: Path, r) -> str | None:
        bad = [p.name for p in (w / "run").iterdir() if p.is_file() and not p.stat().st_mode & 0o020]
        return f"not group-writable under umask 002: {bad}" if bad else None

    add(Case(F, "files respect the umask (002)", train, 0, "", check=group_writable, preexec=lambda: os.umask(0o002)))

    def chmod_metrics(w: Path) -> None:
        copy_run(w)
        os.chmod(w / "run" / "metrics.json", 0o640)

    add(Case(F, "overwriting keeps a file's mode", resume_train(), 0, "", chmod_metrics,
             lambda w, r: None if (w / "run" / "metrics.json").stat().st_mode & 0o777 == 0o640 else
             f"mode became {oct((w / 'run' / 'metrics.json').stat().st_mode & 0o777)}"))

    def truncate_cache(name: str):
        def setup(w: Path) -> None:
            shutil.copytree(base / "cache", w / "cache")
            victim = next((w / "cache").glob(f"Tiny-*/{name}"))
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        return setup

    for name in ("00001_img.npy", "prepared.json", "00002_seg.npy"):
        add(Case(F, f"truncated cache entry {name}", ["plan", "--data", str(data), "--cache-dir", "{w}/cache"], 0,
                 "", truncate_cache(name)))
    add(Case(F, "dataset.json entry: a non-image file outside the folder", ["plan", "--data", "{w}/esc"], 2,
             "is not an image file", lambda w: write_msd(w / "esc", n=3, image_path="/etc/passwd")))
    add(Case(F, "failed train leaves no empty --out", ["train", "--data", "{w}/missing", "--out", "{w}/run",
                                                       *TINY_TRAIN], 2, "", check=absent("run")))
    add(Case(F, "failed tune leaves no empty --out", ["tune", "--space", "{w}/nope.yaml", "--data", "synthetic",
                                                      "--out", "{w}/sweep"], 2, "", check=absent("sweep")))
    def sweep_running(w: Path) -> None:  # another driver holds the sweep folder (as a running `tune` does)
        write_space(w / "space.yaml")
        hold_lock(w, w / "sweep", ".pgps-sweep.lock")

    def holder_undisturbed(w: Path, r) -> str | None:
        alive = release(w)
        left = sorted(p.name for p in (w / "sweep").iterdir())
        return None if alive and left == [".pgps-sweep.lock"] else f"holder alive: {alive}; the folder holds {left}"

    add(Case(F, "tune --resume on a sweep folder another driver runs", [*sweep, "--resume"], 2,
             "in use by another pgps-tune command (pgps-tune tune, pid", sweep_running, holder_undisturbed))

    def fifo(w: Path) -> None:  # nothing ever writes into it: opening it to read would wait for ever
        os.mkfifo(w / "fifo")

    add(Case(F, "a FIFO as train --schedule", ["train", "--data", str(data), "--out", "{w}/run", "--schedule",
                                               "{w}/fifo", *QUIET_CPU], 2, "is not a regular file (a FIFO)", fifo,
             absent("run"), timeout=30))
    add(Case(F, "a FIFO as tune --space", ["tune", "--space", "{w}/fifo", "--data", "synthetic", "--out",
                                           "{w}/sweep"], 2, "is not a regular file (a FIFO)", fifo, absent("sweep"),
             timeout=30))

    def search_state(sweep: Path) -> Path:
        return max((sweep / "ray").glob("*-search/experiment_state-*.json"))

    def one_trial_in_copy(w: Path) -> None:  # the copy's search experiment loses a trial: its export must show it
        state = search_state(w / "copy")
        data = json.loads(state.read_text())
        data["trial_data"] = data["trial_data"][:1]
        state.write_text(json.dumps(data))

    def exported_the_copy(w: Path, r) -> str | None:
        import pyarrow.parquet as pq

        rows = pq.read_table(w / "copy" / "trials.parquet").num_rows
        storage = json.loads((w / "copy" / "sweep.json").read_text()).get("storage_path")
        if rows != 1 or storage != f"{(w / 'copy').resolve()}/ray":
            return f"the copy's export holds {rows} trial(s) (its own experiment: 1), sweep.json's storage {storage}"
        return None

    add(Case(F, "export of a copied sweep reads the copy", ["export", "--experiment", "{w}/copy", "--out", "{w}/copy"],
             0, "its own", lambda w: (finished_copy(w / "copy"), one_trial_in_copy(w)),
             both(exported_the_copy, original_untouched), timeout=600))

    def copy_without_trials(w: Path) -> None:  # the copy's Tune results are gone (the original still has them)
        finished_copy(w / "copy")
        for trial in (w / "copy" / "ray").glob("*/run_trial_*"):
            shutil.rmtree(trial)

    def reported_the_copy(w: Path, r) -> str | None:
        page = (w / "copy" / "report.html").read_text()
        drawn = "no trial&#x27;s result.json under" not in page
        return "the copy's page drew curves it has no results for" if drawn else None

    add(Case(F, "report of a copied sweep reads the copy", ["report", "{w}/copy"], 0, "copy/report.html",
             copy_without_trials, both(reported_the_copy, original_untouched), timeout=600))

    def first_of_two_exported(w: Path) -> None:  # two projects' sweeps of one folder name; A is in the store
        for project in ("a", "b"):
            finished_copy(w / project / "sweep")
        subprocess.run([python, "-m", "pgps_tune.cli", "export", "--experiment", str(w / "a" / "sweep"), "--out",
                        str(w / "a" / "sweep"), "--results-store", str(w / "shared")], check=True, cwd=w,
                       capture_output=True, env={**os.environ, "PGPS_CACHE_DIR": str(base / "cache")}, timeout=120)

    def both_kept(w: Path, r) -> str | None:
        from pgps_tune.results import load_store

        rows = load_store(w / "shared").to_pylist()
        per = {name: sum(x["sweep"] == name for x in rows) for name in {x["sweep"] for x in rows}}
        return None if len(per) == 2 and set(per.values()) == {2} else f"store rows per sweep: {per}"

    add(Case(F, "two sweeps of one folder name stored in one results store",
             ["export", "--experiment", "{w}/b/sweep", "--out", "{w}/b/sweep", "--results-store", "{w}/shared"], 0,
             "already holds a sweep 'sweep'", first_of_two_exported, both(both_kept, original_untouched), timeout=600))
    add(Case(F, "report --out at the sweep's own trials.parquet", ["report", "{w}/sweep", "--out",
                                                                    "{w}/sweep/trials.parquet"], 2,
             "is one of the files of", copied_sweep(), both(unchanged("sweep"), original_untouched), timeout=600))


    def one_image(w: Path) -> None:
        copy_run(w)
        (w / "in").mkdir()
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), w / "in" / "a_0000.nii.gz")

    def and_a_dangling_link(w: Path) -> None:  # beside it, a link whose target went (an unmounted share)
        one_image(w)
        (w / "in" / "b_0000.nii.gz").symlink_to(w / "gone" / "b_0000.nii.gz")

    def only_the_image(w: Path, r) -> str | None:
        there = sorted(p.name for p in (w / "in").iterdir())
        return None if there == ["a_0000.nii.gz"] else f"the input folder holds {there}"

    add(Case(F, "predict over a folder with a dangling link", [*predict, "{w}/in"], 2, "which does not exist",
             and_a_dangling_link, absent("seg")))
    add(Case(F, "predict --out the --input folder", ["predict", "--run", "{w}/run", "--input", "{w}/in", "--out",
                                                    "{w}/in", "--device", "cpu", "--quiet"], 2,
             "is the --input folder", one_image, only_the_image))

    # 7. cluster faults (the multi-node test uses Ray's test cluster on this machine)
    def two_prepares(w: Path) -> None:
        write_msd(w / "d", n=8, shape=(48, 48, 40))
        env = {**os.environ, "PGPS_CACHE_DIR": str(w / "cache")}
        procs = [subprocess.Popen([python, "-m", "pgps_tune.cli", "plan", "--data", str(w / "d")], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        (w / "rcs").write_text(json.dumps([p.wait() for p in procs]))

    def one_cache(w: Path, r) -> str | None:
        rcs = json.loads((w / "rcs").read_text())
        entries = [p.name for p in (w / "cache").iterdir() if not p.name.endswith(".lock")]
        return None if rcs == [0, 0] and len(entries) == 1 else f"rcs {rcs}, cache entries {entries}"

    add(Case(C, "two processes prepare one dataset at once", ["plan", "--data", "{w}/d", "--cache-dir", "{w}/cache"],
             0, "", two_prepares, one_cache))
    add(Case(C, "a worker node dies during a trial (pytest)", [], 0, "passed", timeout=420))

    # 8. packaging
    def lists_spaces(w: Path, r) -> str | None:
        return None if "smoke" in r.stderr else "the error does not list the shipped spaces"

    add(Case(P, "unknown space name lists the shipped ones (outside the tree)",
             ["tune", "--space", "no-such-space", "--data", "synthetic", "--out", "{w}/s"], 2, "", check=lists_spaces))
    add(Case(P, "a shipped space loads from any directory",
             ["tune", "--space", "smoke", "--data", "synthetic", "--out", "{w}/s", "--cpus-per-trial", "64"], 2,
             "--cpus-per-trial 64", timeout=120))
    # 9. layering
    add(Case(L, "results.py imports no Ray", [], 0, ""))

    # 10. data a first version read wrongly without a word (2026-12-07)
    def msd_with(labels=None, names=None, spacing_of=None):
        def setup(w: Path) -> None:
            root = write_msd(w / "d", n=4)
            meta = json.loads((root / "dataset.json").read_text())
            if labels is not None:
                meta["labels"] = labels
            if names is not None:  # rename the cases (ids from the label file names)
                for entry, name in zip(meta["training"], names):
                    for key in ("image", "label"):
                        new = f"./{key}sTr/{name}.nii.gz"
                        (root / entry[key]).rename(root / new)
                        entry[key] = new
            if spacing_of is not None:  # one case far coarser than the others
                for key in ("image", "label"):
                    f = root / meta["training"][spacing_of][key]
                    img = nib.load(f)
                    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([100.0, 100.0, 100.0, 1.0])), f)
            (root / "dataset.json").write_text(json.dumps(meta))
        return setup

    def ids_kept(w: Path, r) -> str | None:
        prepared = next((w / "cache").glob("Tiny-*/prepared.json"))
        ids = json.loads(prepared.read_text())["case_ids"]
        return None if ids == ["1.2.840.1", "1.2.840.2", "1.2.840.3", "1.2.840.4"] else f"case ids {ids}"

    plan = ["plan", "--data", "{w}/d", "--cache-dir", "{w}/cache"]
    add(Case(R, "300 labels (label maps are 8-bit)", plan, 2, "declares 300 labels",
             msd_with(labels={str(k): f"c{k}" for k in range(300)})))
    add(Case(R, "two labels with one value", plan, 2, "both have value 1",
             msd_with(labels={"background": 0, "a": 1, "b": 1, "c": 2})))
    add(Case(R, "nnU-Net's ignore label", plan, 2, "'ignore' label",
             msd_with(labels={"background": 0, "a": 1, "ignore": 2})))
    add(Case(R, "MSD case ids that hold dots (DICOM UIDs)", plan, 0, "",
             msd_with(names=["1.2.840.1", "1.2.840.2", "1.2.840.3", "1.2.840.4"]), ids_kept))
    add(Case(R, "a case at 100 mm among 1 mm ones (10^6 times its voxels)", plan, 2,
             "resampling it from spacing 100x100x100", msd_with(spacing_of=3)))
    add(Case(R, "train --out given as an empty string", ["train", "--data", str(data), "--out", ""], 2,
             "argument --out is empty"))
    add(Case(R, "a schedule flag beside --schedule", ["train", "--data", str(data), "--out", "{w}/run", "--schedule",
                                                      "{w}/s.yaml", "--final-patch", "32", "32", "32"], 2,
             "would be ignored", lambda w: (w / "s.yaml").write_text(
                 "format_version: 1\nfinal_patch: [16, 16, 16]\npools: [2, 2, 2]\nbaseline_batch_size: 2\n"
                 "stages:\n- {patch_size: [16, 16, 16], batch_size: 2, epochs: 2}\n")))
    add(Case(R, "a second train on a run folder in use", ["train", "--data", str(data), "--out", "{w}/run",
                                                          "--epochs", "2", *TINY_TRAIN], 2,
             "is in use by another pgps-tune train", train_running, train_undisturbed))
    add(Case(R, "predict: nnU-Net files of 2 channels for a 1-channel run", [
        "predict", "--run", "{w}/run", "--input", "{w}/in", "--out", "{w}/out"], 2, "holds nnU-Net channel files",
        two_channel_files, absent("out")))
    schedule_yaml = ("format_version: 1\nfinal_patch: [16, 16, 16]\npools: [2, 2, 2]\nbaseline_batch_size: 2\n"
                     "stages:\n- patch_size: [16, 16, 16]\n  batch_size: 2\n  epochs: {epochs}\n")
    add(Case(R, "schedule YAML with a key given twice (YAML kept the last)", [
        "train", "--data", str(data), "--out", "{w}/run", "--schedule", "{w}/s.yaml", *QUIET_CPU], 2,
        "line 9: key 'epochs' appears twice (also at line 8)",
        lambda w: (w / "s.yaml").write_text(schedule_yaml.format(epochs="2\n  epochs: 1000")), absent("run")))
    add(Case(R, "space YAML with a key given twice (YAML kept the last)", sweep, 2,
             "line 5: key 'epochs' appears twice (also at line 3)",
             space_text("parameters: {stages: 2}\nbudget:\n  epochs: 10\n  lr: 0.01\n  epochs: 1000\n"),
             absent("sweep")))
    add(Case(R, "YAML 1.1's octal 010 is YAML 1.2's decimal 10", ["schedule", "--from", "{w}/s.yaml"], 0,
             ", 10 epochs", lambda w: (w / "s.yaml").write_text(schedule_yaml.format(epochs="010"))))
    add(Case(R, "YAML 1.1's base-60 1:30 is refused naming its YAML 1.1 value", sweep, 2,
             "line 2: 1:30 is a base-60 number, which YAML 1.1 and 1.2 read differently (YAML 1.1: 90)",
             space_text("parameters:\n  stages: 1:30\n"), absent("sweep")))
    add(Case(R, "YAML 1.1's boolean off is YAML 1.2's text 'off'", sweep, 2,
             "budget.augment: unknown augmentation 'off'",
             space_text("parameters: {stages: 2}\nbudget: {augment: off, lr: 1e-4}\n"), absent("sweep")))
    add(Case(R, "confirm --splits given a JSON object, not a list of folds",
             ["confirm", "{w}/sweep", "--splits", "{w}/splits.json"], 2, "it is a JSON object, not a list",
             copied_sweep(lambda w: (w / "splits.json").write_text(
                 json.dumps({"train": ["case_000"], "val": ["case_001"]}))),
             both(unchanged("sweep"), original_untouched), timeout=600))
    add(Case(C, "tune --address where nothing listens", [*sweep, "--address", "127.0.0.1:1"], 2,
             "no Ray cluster reachable at --address 127.0.0.1:1", space(), timeout=120))
    add(Case(C, "tune --address of a Ray Client (ray://)", [*sweep, "--address", "ray://127.0.0.1:10001"], 2,
             "is a Ray Client address, which pgps-tune cannot use", space(), absent("sweep"), timeout=120))
    add(Case(C, "tune --autoscaling without --address (a Ray of the sweep's own does not autoscale)",
             [*sweep, "--autoscaling"], 2, "--autoscaling is for a Ray cluster whose autoscaler starts nodes",
             space(), absent("sweep"), timeout=120))
    add(Case(C, "tune --address auto with RAY_ADDRESS a dashboard URL (as for 'ray job submit')",
             [*sweep, "--address", "auto"], 2, "RAY_ADDRESS=http://127.0.0.1:8265 (which --address auto reads)",
             space(), absent("sweep"), env={"RAY_ADDRESS": "http://127.0.0.1:8265"}, timeout=120))
    return out


def _diverged_trials(w: Path) -> str | None:
    import pyarrow.parquet as pq

    p = w / "sweep" / "trials.parquet"
    if not p.is_file():
        return "no trials.parquet"
    rows = pq.read_table(p).to_pylist()
    if not rows or not all(r["failed"] and r["error"].startswith("diverged") for r in rows):
        return f"not every trial recorded as diverged: {[(r['trial_id'], r['status'], r['error']) for r in rows]}"
    if any(r["num_failures"] > 0 for r in rows):
        return "a diverged trial was retried"
    if (w / "sweep" / "best_schedule.yaml").exists():
        return "a diverged trial was exported as the best"
    return None


def special(case: Case, base: Path, python: str) -> Outcome | None:
    """Cases that are not one CLI call."""
    t0 = time.time()
    if case.name.startswith("a worker node dies"):
        cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_tuner_recovery.py"),
               "-k", "node"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=case.timeout)
        last = (r.stdout.strip().splitlines() or [""])[-1]
        ok = r.returncode == 0 and "passed" in last and "skipped" not in last
        failed = [ln for ln in r.stdout.splitlines() if ln.startswith(("E ", "FAILED"))]  # pytest's reason
        return Outcome(case, "pytest tests/test_tuner_recovery.py -k node", r.returncode, last, "ok" if ok else "FAIL",
                       "" if ok else " / ".join(failed[:3])[-300:] or r.stdout[-300:], time.time() - t0)
    if case.name.startswith("output piped into head -1"):
        # a schedule whose YAML is far larger than a pipe's buffer: `head -1` leaves while it is being written
        w = base / "5-pipe"
        w.mkdir()
        (w / "s.yaml").write_text(
            "format_version: 1\nfinal_patch: [16, 16, 16]\npools: [2, 2, 2]\nbaseline_batch_size: 2\n"
            "stages:\n- {patch_size: [16, 16, 16], batch_size: 2, epochs: 2}\nmeta:\n"
            + "".join(f"  note{i}: {'x' * 60}\n" for i in range(5000)))
        shell = '"$0" -m pgps_tune.cli schedule --from s.yaml --format yaml | head -1; exit "${PIPESTATUS[0]}"'
        r = subprocess.run(["bash", "-c", shell, python], capture_output=True, text=True, cwd=w, timeout=60,
                           env={**os.environ, "PGPS_CACHE_DIR": str(base / "cache")})
        # 141: the broken pipe is found (as `yes | head -1`); 0: the interpreter took the write that the leaving
        # reader cut short as done and never saw the broken pipe. Either way nothing may be printed on stderr.
        ok = r.returncode in (0, 141) and r.stderr == "" and r.stdout == "format_version: 1\n"
        return Outcome(case, "pgps-tune schedule --from W/s.yaml --format yaml | head -1", r.returncode,
                       f"stdout {r.stdout.strip()!r}; stderr {'empty' if not r.stderr else repr(r.stderr[-200:])}",
                       "ok" if ok else "FAIL", "" if ok else f"exit {r.returncode}, stderr {r.stderr[-200:]!r}",
                       time.time() - t0)
    if case.name.startswith("results.py imports no Ray"):
        code = ("import sys, pgps_tune.results, pgps_tune.cli, pgps_tune.trainer, pgps_tune.space;"
                "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=base)
        last = r.stdout.strip()
        ok = r.returncode == 0 and last == "[]"
        return Outcome(case, f"python -c \"{code}\"", r.returncode, last, "ok" if ok else "FAIL",
                       "" if ok else r.stderr[-300:], time.time() - t0)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", default=None, help="write the markdown report here (e.g. docs/ROBUSTNESS.md)")
    ap.add_argument("--only", default=None, help="run only the cases of this class number")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    python = sys.executable
    base = Path(tempfile.mkdtemp(prefix="pgps-robust-"))
    t_all = time.time()
    try:
        write_msd(base / "tiny")
        env = {**os.environ, "PGPS_CACHE_DIR": str(base / "cache"), "PGPS_RESULTS_DIR": str(base / "store")}
        subprocess.run([python, "-m", "pgps_tune.cli", "train", "--data", str(base / "tiny"), "--out",
                        str(base / "trained"), "--epochs", "6", *TINY_TRAIN, "--max-train-seconds", "0.001"],
                       check=True, env=env, cwd=base)  # stops after its first epoch, with a checkpoint to resume
        results = []
        for case in cases(base, python):
            if a.only and case.klass.split()[0] != a.only:
                continue
            o = special(case, base, python) or run_case(case, base, python)
            print(f"{o.verdict:4} [{o.case.klass}] {o.case.name}: exit {o.rc} ({o.seconds:.0f}s)"
                  + (f" -- {o.why}" if o.why else ""), flush=True)
            results.append(o)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    ok = sum(o.verdict == "ok" for o in results)
    print(f"{ok} passed, {len(results) - ok} failed")
    if a.report:
        write_report(Path(a.report), results, time.time() - t_all)
    return 0 if ok == len(results) else 1


def write_report(path: Path, results: list[Outcome], seconds: float) -> None:
    from pgps_tune.errors import atomic_write_text

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")[:220]

    ok = sum(o.verdict == "ok" for o in results)
    lines = [
        "# Robustness: bad inputs and faults, through the real CLI", "",
        f"Generated by `python scripts/robustness.py --report {path}` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} cores, {platform.platform()}), {seconds / 60:.1f} minutes: "
        f"**{ok} of {len(results)} cases handled**.", "",
        "Each case runs `pgps-tune` in its own process on tiny data the script writes. A case is *ok* when the "
        "exit code is the expected one (0 done, 1 internal error, 2 user error, 130 Ctrl-C, 143 SIGTERM), "
        "nothing printed a traceback, the line that says what happened (the *last line* column: the last "
        "`pgps-tune:` line, else the last line printed) says what the case expects, and the check of the files left "
        "behind holds (no code run from a crafted file, nothing half-written, nothing lost). "
        "`W` is the case's work folder, `B` the shared one.", "",
    ]
    # the cases run in the order their shared setup needs; the report lists each class once, in class order,
    # and a class's cases in the order they are defined (``results`` keeps that order within a class)
    by_class: dict[str, list[Outcome]] = {}
    for o in results:
        by_class.setdefault(o.case.klass, []).append(o)
    for klass in sorted(by_class, key=lambda k: int(k.split()[0])):
        lines += ["", f"## {klass}", "", "| case | command | exit | last line | verdict |", "|---|---|---|---|---|"]
        for o in by_class[klass]:
            verdict = o.verdict if not o.why else f"{o.verdict}: {o.why}"
            lines.append(f"| {cell(o.case.name)} | `{cell(o.command)}` | {o.rc} | {cell(o.last)} | {cell(verdict)} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
