"""Exports and the results store under damage: atomic store parts, sweeps of one name kept apart, all-or-none
exports, sweep.json checked field by field, unreachable storage (no Ray run: synthetic records and tables)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sweep_meta, trial_setup

from pgps_tune import results
from pgps_tune import schedule as sch
from pgps_tune.cli import main
from pgps_tune.errors import PgpsError, atomic_write_text
from pgps_tune.results import TrialRecord, export_sweep, load_store, store_sweep

S = sch.preset("paper", (16, 16, 16), (2, 2, 2), 2, 10, "resource", None)


def record(tid: str, dice: float) -> TrialRecord:
    return TrialRecord(tid, "TERMINATED", {"stages": 2}, {
        "val_dice": dice, "score": dice, "completed": True, "schedule": json.dumps(S.to_dict()), "epoch": 10,
        "schedule_voxel_fraction": S.voxel_fraction()})


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def stored_dice(store: Path) -> dict[str, list[float]]:
    t = load_store(store)
    out: dict[str, list[float]] = {}
    for r in t.to_pylist():
        out.setdefault(r["sweep"], []).append(r["final_dice"])
    return out


def test_sweeps_sharing_a_folder_name_keep_their_own_rows_and_a_reexport_replaces_its_own(tmp_path, capsys):
    store = tmp_path / "store"
    a, b = tmp_path / "projA" / "demo", tmp_path / "projB" / "demo"
    export_sweep(a, sweep_meta(a), [record("t1", 0.6)], store)
    export_sweep(b, sweep_meta(b), [record("t1", 0.95)], store)  # a copy of A, edited: same trial ids
    err = capsys.readouterr().err
    assert "already holds a sweep 'demo'" in err and str(a) in err
    kept = stored_dice(store)
    assert kept.pop("demo") == [0.6] and list(kept.values()) == [[0.95]]  # B under demo-HASH of its folder
    b_key = next(iter(kept))
    export_sweep(a, sweep_meta(a), [record("t1", 0.7)], store)  # the same sweeps again: each replaces its own
    export_sweep(b, sweep_meta(b), [record("t1", 0.97)], store)
    assert stored_dice(store) == {"demo": [0.7], b_key: [0.97]}
    # export --out elsewhere keeps the sweep's identity: the sweep folder, not the export folder
    export_sweep(tmp_path / "elsewhere", sweep_meta(a), [record("t1", 0.71)], store, origin=a)
    assert stored_dice(store) == {"demo": [0.71], b_key: [0.97]}
    assert results.best_schedule("synthetic", store).meta["sweep"] == b_key


def test_a_store_partition_written_before_origins_is_replaced_only_by_its_own_sweep(tmp_path):
    store = tmp_path / "store"
    export_sweep(tmp_path / "demo", sweep_meta(tmp_path), [record("t1", 0.6)], store)
    part = store / "dataset=synthetic" / "sweep=demo" / "part-0.parquet"
    pq.write_table(pq.read_table(part).drop_columns([results.ORIGIN]), part)  # as an older pgps-tune wrote it
    export_sweep(tmp_path / "moved" / "demo", sweep_meta(tmp_path), [record("t1", 0.65)], store)
    assert stored_dice(store) == {"demo": [0.65]}  # the same trials: that sweep's own rows, replaced
    pq.write_table(pq.read_table(part).drop_columns([results.ORIGIN]), part)
    export_sweep(tmp_path / "other" / "demo", sweep_meta(tmp_path), [record("t9", 0.5)], store)
    kept = stored_dice(store)
    assert kept.pop("demo") == [0.65] and list(kept.values()) == [[0.5]]


def test_the_store_part_is_replaced_atomically_and_a_damaged_part_is_named(tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    export_sweep(tmp_path / "demo", sweep_meta(tmp_path), [record("t1", 0.6)], store)
    part = store / "dataset=synthetic" / "sweep=demo" / "part-0.parquet"
    before = part.read_bytes()

    def full_disk(table, where, **kw):
        where.write(b"PAR1 half a table")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results.pq, "write_table", full_disk)
    with pytest.raises(PgpsError, match=r"No space left on device\); the rows stored before are kept"):
        store_sweep(pa.Table.from_pylist([], schema=results.SCHEMA), sweep_meta(tmp_path), store,
                    origin=tmp_path / "demo")
    monkeypatch.undo()
    assert part.read_bytes() == before and os.listdir(part.parent) == ["part-0.parquet"]  # no temporary file
    assert stored_dice(store) == {"demo": [0.6]}
    part.write_bytes(before[: len(before) // 2])  # what a non-atomic writer left after a kill
    assert main(["best", "--dataset", "synthetic", "--results-store", str(store)]) == 2
    err = one_line(capsys)
    assert str(part) in err and "move it out of the store" in err


def test_export_replaces_all_its_files_or_none(tmp_path, capsys):
    out, store = tmp_path / "demo", tmp_path / "store"
    export_sweep(out, sweep_meta(out), [record("t1", 0.6)], store)
    files = {n: (out / n).read_bytes() for n in ("trials.parquet", "summary.json", "best_schedule.yaml")}
    for name in files:
        (out / name).rename(tmp_path / "aside")
        (out / name).mkdir()
        with pytest.raises(PgpsError, match=f"cannot replace {out / name}: it is a folder"):
            export_sweep(out, sweep_meta(out), [record("t1", 0.9)], store)
        (out / name).rmdir()
        (tmp_path / "aside").rename(out / name)
        assert {n: (out / n).read_bytes() for n in files} == files  # not one replaced
        assert stored_dice(store) == {"demo": [0.6]}
    assert sorted(os.listdir(out)) == sorted(files)  # no temporary file left


def test_atomic_write_turns_a_failed_replace_into_one_line(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")

    def refuse(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PgpsError, match=r"cannot replace .*x\.json: Operation not permitted"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.update(finished="no"), "malformed fields (finished)"),
    (lambda m: m.update(format_version=99), "format_version 99, newer than this pgps-tune reads (2); upgrade"),
    (lambda m: m.update(format_version="abc"), "format_version 'abc' is not one pgps-tune writes"),
    (lambda m: m["objective"].update(type="bogus"), "malformed fields (objective)"),
    (lambda m: m["asha"].update(max_t=-5), "malformed fields (asha)"),
    (lambda m: m["asha"].update(grace_period=50), "malformed fields (asha)"),
    (lambda m: m.update(experiments={"search": "demo-references", "references": "demo-search"}),
     "malformed fields (experiments)"),
    (lambda m: m.update(trial_setup="x"), "malformed fields (trial_setup)"),
    (lambda m: m.update(trial_setup={"data": "synthetic", "final_patch": [16, 16, 16], "pools": [2, 2, 2],
                                     "objective": {}, "budget": {"epochs": 2}}), "malformed fields (trial_setup)"),
    (lambda m: m.update(trial_setup={**trial_setup(Path("x")), "budget": {**trial_setup(Path("x"))["budget"],
                                                                          "network": None}}),
     "malformed fields (trial_setup)"),
    (lambda m: m.update(confirmation={"repeat": "seed", "configs": "x", "epochs": 2, "top_k": 1,
                                      "experiments": []}), "malformed fields (confirmation)"),
    (lambda m: m.update(confirmation={"repeat": "seed", "configs": [], "epochs": 2, "top_k": 1, "experiments": [],
                                      "replaced": [{"top_k": 1}]}), "malformed fields (confirmation)"),
    (lambda m: m.update(pending_confirm={"key": "confirm", "configs": [], "settings": {"seeds": "3"}}),
     "malformed fields (pending_confirm)"),
])
def test_sweep_json_fields_are_checked_before_anything_is_read(tmp_path, capsys, edit, needle):
    exp = tmp_path / "demo"
    exp.mkdir()
    meta = sweep_meta(exp)
    edit(meta)
    (exp / "sweep.json").write_text(json.dumps(meta))
    for argv in (["export", "--experiment", str(exp), "--out", str(exp)], ["confirm", str(exp)]):
        assert main(argv) == 2
        err = one_line(capsys)
        assert needle in err and str(exp / "sweep.json") in err, err
    assert os.listdir(exp) == ["sweep.json"]


def test_export_into_the_sweep_folder_rewrites_its_page(tmp_path, monkeypatch, capsys):
    from pgps_tune import tuner

    exp = tmp_path / "demo"
    exp.mkdir()
    (exp / "sweep.json").write_text(json.dumps(sweep_meta(exp)))
    (exp / "report.html").write_text("<p>an old page</p>")
    monkeypatch.setattr(tuner, "read_trials", lambda meta: [record("t1", 0.61)])
    assert main(["export", "--experiment", str(exp), "--out", str(exp), "--results-store", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    page = (exp / "report.html").read_text()
    assert f"report: {exp / 'report.html'}" in out and "an old page" not in page and "t1" in page


def test_unreachable_remote_storage_is_one_line_naming_storage_and_credentials(tmp_path):
    from pgps_tune.tuner import read_trials

    with pytest.raises(PgpsError, match=r"cannot reach the sweep's --storage nosuch://bucket/ray .*credentials"):
        read_trials(sweep_meta(tmp_path, storage="nosuch://bucket/ray", storage_path="bucket/ray"))


def test_a_signal_after_the_command_finished_does_not_turn_success_into_an_interrupt(tmp_path):
    # the console script calls main() with no arguments; a Ctrl-C landing after its work is done (while the
    # interpreter shuts down) must leave exit 0
    code = ("import os, signal, sys; from pgps_tune.cli import main; rc = main(); "
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM); sys.exit(rc)")
    argv = ["schedule", "--preset", "constant", "--final-patch", "16", "16", "16", "--pools", "2", "2", "2",
            "--epochs", "4"]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    assert "stage" in done.stdout and "interrupted" not in done.stderr


def test_best_names_ranked_sweeps_of_another_budget_or_final_patch_and_ranks_comparable_ones_with_sweep(
        tmp_path, capsys):
    store = tmp_path / "store"
    long = sch.preset("paper", (16, 16, 16), (2, 2, 2), 2, 40, "resource", None)
    big = sch.constant((32, 32, 32), (2, 2, 2), 2, 10)

    def rec(tid, dice, s):
        return TrialRecord(tid, "TERMINATED", {"stages": 2}, {
            "val_dice": dice, "score": dice, "completed": True, "schedule": json.dumps(s.to_dict()), "epoch": 10,
            "schedule_voxel_fraction": s.voxel_fraction()})

    for name, r, patch in (("short", record("t1", 0.6), [16, 16, 16]), ("alike", record("t2", 0.5), [16, 16, 16]),
                           ("long", rec("t3", 0.9, long), [16, 16, 16]), ("big", rec("t4", 0.7, big), [32, 32, 32])):
        export_sweep(tmp_path / name, sweep_meta(tmp_path / name, sweep=name, final_patch=patch), [r], store)
    capsys.readouterr()
    out = tmp_path / "b.yaml"
    assert main(["best", "--dataset", "synthetic", "--results-store", str(store), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert sch.load(out).meta["sweep"] == "long" and err.count("\n") == 1, err
    assert err.startswith("pgps-tune: note: the winner, sweep 'long' (40 epochs x ? iterations, final patch 16x16x16")
    assert "alike (budget); big (budget, final patch); short (budget)" in err
    assert err.rstrip().endswith("rank comparable sweeps only with --sweep NAME (repeatable)")
    assert main(["best", "--dataset", "synthetic", "--results-store", str(store), "--sweep", "short", "--sweep",
                 "alike", "--out", str(out)]) == 0
    assert sch.load(out).meta["sweep"] == "short" and capsys.readouterr().err == ""  # alike: nothing to note
    assert main(["best", "--dataset", "synthetic", "--results-store", str(store), "--sweep", "shrot"]) == 2
    assert "no sweep 'shrot' of dataset 'synthetic'; give --sweep as one of alike, big, long, short" in one_line(capsys)


def test_a_store_the_sweep_could_not_write_is_refused_before_it_trains(tmp_path, capsys):
    # an unwritable store was found at the export, after every trial had trained (exit 2, no report)
    (tmp_path / "file").write_text("x")
    space = tmp_path / "s.yaml"
    space.write_text(json.dumps({"parameters": {"stages": 1}, "budget": {"epochs": 10}}))
    for store, needle in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "store", "is not writable")):
        out = tmp_path / "o"
        assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--quiet",
                     "--results-store", str(store)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pgps-tune: error: ") and needle in err and "--results-store" in err, err
        assert not out.exists()


def test_export_refuses_nnunet_flags_without_nnunet(tmp_path, capsys):
    # export's --configuration, --trainer, --other-dataset without --nnunet were ignored (the last one alone refused)
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps(sweep_meta(folder)))
    assert main(["export", "--experiment", str(folder), "--out", str(folder), "--configuration", "2d",
                 "--trainer", "T"]) == 2
    assert one_line(capsys) == ("pgps-tune: error: --configuration, --trainer go with --nnunet PLANS; without it "
                                "nothing would use them: add --nnunet PLANS, or drop them\n")


def test_a_sweep_whose_trials_all_failed_exits_2_naming_the_most_frequent_error(tmp_path, capsys, monkeypatch):
    # it ended 'done' (exit 0) with no best_schedule.yaml: `tune ... && use the schedule` went on
    import pgps_tune.tuner as tuner

    def fake_sweep(opts):
        fails = [TrialRecord(f"t{i}", "ERROR", {"stages": 2}, error=e) for i, e in
                 enumerate(["CUDA out of memory\nmore", "CUDA out of memory", "ValueError: bad patch"])]
        return export_sweep(opts.out, sweep_meta(opts.out, sweep=opts.out.name), fails, tmp_path / "store")

    monkeypatch.setattr(tuner, "sweep", fake_sweep)
    space = tmp_path / "s.yaml"
    space.write_text(json.dumps({"parameters": {"stages": 2}, "budget": {"epochs": 10}}))
    out = tmp_path / "sw"
    assert main(["tune", "--space", str(space), "--data", "synthetic", "--out", str(out), "--quiet",
                 "--results-store", str(tmp_path / "store")]) == 2
    captured = capsys.readouterr()
    assert "No trial completed, so there is no best schedule." in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith(f"pgps-tune: error: no trial completed (3 of 3 trial(s) failed, 0 stopped early), so {out} "
                          "holds no best schedule; the most frequent error (2x): CUDA out of memory; fix that"), err
    assert err.endswith(f"'pgps-tune trials {out} --status failed --columns trial_id,error --limit 0')")
    assert (out / "trials.parquet").is_file() and not (out / "best_schedule.yaml").exists()


def test_best_schedule_from_python_takes_one_sweep_name_and_names_bad_arguments(tmp_path):
    store = tmp_path / "store"
    export_sweep(tmp_path / "demo", sweep_meta(tmp_path / "demo"), [record("t1", 0.6), record("t2", 0.7)], store)
    assert results.best_schedule("synthetic", store, sweeps="demo").meta["trial_id"] == "t2"  # not 'd', 'e', ...
    with pytest.raises(PgpsError, match="objective 'dice'.*used: max_dice"):
        results.best_schedule("synthetic", store, objective="dice")
    with pytest.raises(PgpsError, match="dataset must be a dataset's name"):
        results.best_schedule(None, store)
    best = results.best_schedule("synthetic", store)
    for name in ("b.yaml", "b.json"):  # what 'best --out' writes loads back with its provenance
        back = sch.load(best.save(tmp_path / name))
        assert back == best and back.meta == best.meta


def test_best_reads_only_the_asked_datasets_sweeps(tmp_path):
    # a store of many sweeps: 'best --dataset A' (and --warm-start) read A's folders, not every dataset's rows
    store = tmp_path / "store"
    export_sweep(tmp_path / "a", sweep_meta(tmp_path / "a", "a", dataset="A"), [record("t1", 0.6)], store)
    export_sweep(tmp_path / "b", sweep_meta(tmp_path / "b", "b", dataset="B"), [record("t2", 0.7)], store)
    (store / "dataset=B" / "sweep=b" / "part-0.parquet").write_bytes(b"not parquet")  # read only when B is asked
    assert results.best_schedule("A", store).meta["trial_id"] == "t1"
    assert load_store(store, "A")["trial_id"].to_pylist() == ["t1"] and results.stored_datasets(store) == ["A", "B"]
    with pytest.raises(PgpsError, match="dataset=B/sweep=b/part-0.parquet has a footer"):
        results.best_schedule("B", store)
    with pytest.raises(PgpsError, match="no completed 'max_dice' trials for dataset 'C'.*known: \\['A', 'B'\\]"):
        results.best_schedule("C", store)


def test_a_parquet_file_that_decodes_to_gigabytes_is_refused_before_it_is_decoded(tmp_path, capsys, monkeypatch):
    # Parquet stores a value repeated on every row once: a few hundred bytes on disk decode to 300 MB; the readers
    # of a sweep's table and of the store count the decoded size first, and refuse it, the row count, a footer a
    # sparse file makes huge, odd column types and FIFOs before they allocate anything
    sweep, store = tmp_path / "demo", tmp_path / "store"
    export_sweep(sweep, sweep_meta(sweep), [record("t1", 0.6)], store)
    results.write_meta(sweep, sweep_meta(sweep))
    part = next(store.glob("dataset=synthetic/sweep=demo/*.parquet"))
    one = pq.read_table(part).slice(0, 1)

    def repeated(path: Path, rows: int, column: str = "error", value: str = "x" * 10_000) -> None:
        # every column of the real table, one value repeated on all rows (dictionary-encoded: a few KiB)
        cells = {c: pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()),
                                                   pa.array([value if c == column else one[c][0].as_py()]))
                 if pa.types.is_string(one[c].type) else pa.array([one[c][0].as_py()] * rows, one[c].type)
                 for c in one.schema.names}
        pq.write_table(pa.table(cells), path, store_schema=False, compression="zstd")

    def sparse_footer(path: Path) -> None:  # 8 MiB of zeros (none on disk) whose last bytes claim them as footer
        with open(path, "wb") as fh:
            fh.truncate(8 << 20)
            fh.seek((8 << 20) - 8)
            fh.write(((8 << 20) - 12).to_bytes(4, "little") + b"PAR1")

    def odd_type(path: Path) -> None:
        pq.write_table(one.set_column(0, "trial_id", pa.array([["t1"]])), path)

    cases = [(lambda p: repeated(p, 30_000), "decodes to more than 256 MiB"),
             (lambda p: pq.write_table(pa.table({"trial_id": pa.nulls(1_000_001, pa.string())}), p),
              "holds 1,000,001 rows"),
             (sparse_footer, "has a footer of 7 MiB"), (odd_type, "types pgps-tune never writes: trial_id (list"),
             (os.mkfifo, "is not a regular file (a FIFO)")]
    table, kept = sweep / "trials.parquet", part.read_bytes()
    for make, needle in cases:
        for f, command in [(table, ["trials", str(sweep)]), (table, ["report", str(sweep)]),
                           (part, ["best", "--dataset", "synthetic", "--results-store", str(store)])]:
            f.unlink()
            make(f)
            assert main(command) == 2
            err = one_line(capsys)
            assert needle in err and str(f) in err and ("export" in err or "store" in err), err
            assert not (sweep / "report.html").exists()
    part.unlink()  # the FIFO of the last case
    part.write_bytes(kept)
    monkeypatch.setattr(results, "MAX_PARQUET_BYTES", 1 << 20)  # the page sizes, before reading them
    repeated(part, 1, "schedule", "x" * (2 << 20))
    with pytest.raises(PgpsError, match="has pages that decompress to more than 1 MiB"):
        load_store(store)
    part.write_bytes(kept)
    export_sweep(tmp_path / "other", sweep_meta(tmp_path / "other", "other"), [record("t2", 0.7)], store)
    monkeypatch.setattr(results, "MAX_STORE_BYTES", pq.read_table(part).nbytes + 1)  # the store's sweeps together
    with pytest.raises(PgpsError, match="MiB of trials .reading .*; move sweeps"):
        load_store(store)


def test_a_page_header_claiming_more_than_the_footer_says_is_refused_before_pyarrow_sizes_the_page(
        tmp_path, capsys, monkeypatch):
    # pyarrow sizes a page's buffer from the page's own header, which the footer's sizes do not bound: a forged
    # header claims 2 GiB and a few KiB of zstd fill them (scripts/robustness.py); here a header claims 128 MiB
    # for a page of 1.3 MB, and the reader, bounded to 64 MiB, refuses the file from the headers
    sweep = tmp_path / "demo"
    export_sweep(sweep, sweep_meta(sweep), [record("t1", 0.6)], tmp_path / "store")
    table = sweep / "trials.parquet"
    one = pq.read_table(table)
    one = one.set_column(one.schema.get_field_index("error"), "error", pa.array(["x" * 1_300_000]))
    pq.write_table(one, table, use_dictionary=False, compression="zstd")
    meta = pq.ParquetFile(table).metadata
    chunk = meta.row_group(0).column(one.schema.get_field_index("error"))
    data, at = bytearray(table.read_bytes()), chunk.data_page_offset
    # the header opens with type (i32 field 1) and uncompressed_page_size (field 2), a 4-byte zigzag varint here
    assert data[at] == data[at + 2] == 0x15 and data[at + 6] < 0x80 <= data[at + 5], bytes(data[at:at + 7])
    data[at + 3:at + 7] = b"\xfe\xff\xff\x7f"  # 128 MiB - 1
    table.write_bytes(data)
    assert chunk.total_uncompressed_size < 2 << 20
    monkeypatch.setattr(results, "MAX_PARQUET_BYTES", 64 << 20)
    assert main(["trials", str(sweep)]) == 2
    err = one_line(capsys)
    assert f"{table} has pages that decompress to more than 64 MiB" in err and "pgps-tune export" in err, err


def export_confirmed(out: Path, store: Path) -> dict:
    """A sweep 'conf' whose search trial scored 0.70 and its confirmation repeats 0.74 and 0.78 (seeds 1, 2), exported
    into ``store``; its summary."""
    configs = [{"role": role, "candidate": name, "seed": seed, "epochs": 10, "stages": 2}
               for name, role in (("baseline", "baseline"), ("srch", "search")) for seed in (1, 2)]
    dice = {("baseline", 1): 0.5, ("baseline", 2): 0.52, ("srch", 1): 0.74, ("srch", 2): 0.78}
    records = [record("srch", 0.70)] + [
        TrialRecord(f"c{i}", "TERMINATED", c, {**record("x", dice[c["candidate"], c["seed"]]).last_result,
                                               "role": c["role"]}, phase="confirm") for i, c in enumerate(configs)]
    meta = sweep_meta(out, sweep="conf", confirmation={"repeat": "seed", "configs": configs, "epochs": 10,
                                                       "top_k": 1, "experiments": ["conf-confirm"]})
    return export_sweep(out, meta, records, store)


def test_a_confirmed_winner_has_one_dice_in_summary_best_schedule_and_best(tmp_path, capsys):
    # every export and 'best' give the winner the mean, 0.76, and name its searched trial; a sweep without
    # confirmation keeps its trial's Dice
    store, out = tmp_path / "store", tmp_path / "conf"
    summary = export_confirmed(out, store)
    export_sweep(tmp_path / "plain", sweep_meta(tmp_path / "plain", sweep="plain"), [record("t1", 0.75)], store)
    assert summary["best"]["trial_id"] == "srch" and summary["best"]["final_dice"] == pytest.approx(0.76)
    exported = sch.load(out / "best_schedule.yaml").meta
    assert (exported["trial_id"], exported["recipe_trial"]) == ("srch", "c2")  # c2: the file's recipe (seed 1)
    assert exported["val_dice"] == exported["score"] == pytest.approx(0.76)
    assert exported["confirmation"]["dice"]["n"] == 2 and exported["confirmation"]["repeat"] == "seed"
    capsys.readouterr()
    assert main(["best", "--dataset", "synthetic", "--results-store", str(store), "--format", "json"]) == 0
    best = json.loads(capsys.readouterr().out)["meta"]  # 0.76 (confirmed) beats the plain sweep's 0.75
    assert {k: best[k] for k in ("sweep", "trial_id", "recipe_trial")} == {
        "sweep": "conf", "trial_id": "srch", "recipe_trial": "c2"}
    assert best["val_dice"] == best["score"] == pytest.approx(0.76) and best["confirmation"]["dice"]["n"] == 2
    plain = results.best_schedule("synthetic", store, sweeps="plain").meta
    assert plain["val_dice"] == 0.75 and "confirmation" not in plain and "recipe_trial" not in plain
    part = next(store.glob("dataset=synthetic/sweep=conf/*.parquet"))  # a store handed over: the cell is checked
    t = pq.read_table(part)
    for cell in ('{"val_dice": "0.99"}', "{", '{"trial_id": "srch", "recipe_trial": "c2", "val_dice": 2e308, '
                 '"score": 1, "confirmation": {}}'):
        cells = [cell if v else "" for v in t["confirmed"].to_pylist()]
        pq.write_table(t.set_column(t.schema.get_field_index("confirmed"), "confirmed", pa.array(cells)), part)
        with pytest.raises(PgpsError, match="trial c2's confirmed column is not the confirmed winner's figures"):
            load_store(store)


def test_a_confirmed_sweep_stored_before_the_confirmed_column_ranks_by_its_winner(tmp_path, capsys):
    # the store part as an older pgps-tune wrote it: 'best' derives the winner's means from the confirmation's rows
    store = tmp_path / "store"
    export_confirmed(tmp_path / "conf", store)
    export_sweep(tmp_path / "plain", sweep_meta(tmp_path / "plain", sweep="plain"), [record("t1", 0.75)], store)
    current = results.best_schedule("synthetic", store).meta
    part = next(store.glob("dataset=synthetic/sweep=conf/*.parquet"))
    t = pq.read_table(part).drop_columns([results.CONFIRMED])
    pq.write_table(t, part)
    capsys.readouterr()
    assert results.best_schedule("synthetic", store).meta == current  # 0.76 (confirmed), not the search's 0.70
    assert current["sweep"] == "conf" and capsys.readouterr().err == ""
    params = t["params"].to_pylist()  # the trials of two confirmations (another budget): the rows cannot tell
    params[-1] = params[-1].replace('"epochs": 10', '"epochs": 20')
    pq.write_table(t.set_column(t.schema.get_field_index("params"), "params", pa.array(params)), part)
    assert results.best_schedule("synthetic", store).meta["sweep"] == "plain"  # conf's search trial: 0.70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep 'conf' was stored before" in err, err
    assert f"'pgps-tune export --experiment {tmp_path / 'conf'} --out {tmp_path / 'conf'}'" in err, err


def front_records() -> list[TrialRecord]:
    """A pareto sweep's trials whose front's knee, max_dice and cheapest_within=0.1 are three trials."""
    recs = []
    for tid, dice, cost in (("max", 0.80, 1.0), ("knee", 0.79, 0.5), ("cheap", 0.70, 0.2), ("off", 0.60, 0.6)):
        r = record(tid, dice)
        r.last_result["schedule_voxel_fraction"] = cost
        recs.append(r)
    return recs


def test_best_of_a_pareto_sweep_is_the_schedule_its_export_picked(tmp_path, capsys):
    # 'best --objective pareto' gave the front's highest Dice (its most expensive end), not the knee that the
    # sweep's best_schedule.yaml and summary.json hold
    store, out = tmp_path / "store", tmp_path / "b.yaml"
    recs = front_records()
    summary = export_sweep(tmp_path / "p", sweep_meta(tmp_path / "p", objective={"type": "pareto", "pick": "knee"}),
                           recs, store)
    assert summary["best"]["trial_id"] == "knee"
    best = ["best", "--dataset", "synthetic", "--objective", "pareto", "--results-store", str(store), "--out", str(out)]
    assert main(best) == 0 and sch.load(out).meta["trial_id"] == "knee"
    assert main([*best, "--pick", "max_dice"]) == 0 and sch.load(out).meta["trial_id"] == "max"
    assert main([*best, "--pick", "cheapest_within=0.1"]) == 0 and sch.load(out).meta["trial_id"] == "cheap"
    capsys.readouterr()
    assert main(["best", "--dataset", "synthetic", "--results-store", str(store), "--pick", "knee"]) == 2
    assert "--pick chooses from a Pareto front, but --objective is max_dice" in one_line(capsys)


def test_the_rule_an_export_picked_with_is_kept_by_best_and_by_later_exports(tmp_path, monkeypatch, capsys):
    # 'export --pick max_dice' wrote the front's max-Dice schedule, but 'best --objective pareto' gave the knee
    # (its default), and a later 'export' without --pick (or 'tune --resume') went back to the space's rule
    from pgps_tune import tuner

    store, sweep, out = tmp_path / "store", tmp_path / "p", tmp_path / "b.yaml"
    sweep.mkdir()
    results.write_meta(sweep, sweep_meta(sweep, "p", objective={"type": "pareto", "pick": "knee"}))
    monkeypatch.setattr(tuner, "read_trials", lambda meta: front_records())
    best = ["best", "--dataset", "synthetic", "--objective", "pareto", "--results-store", str(store), "--out", str(out)]
    assert tuner.export(sweep, sweep, store)["best"]["trial_id"] == "knee" and "pick" not in results.read_meta(sweep)
    assert tuner.export(sweep, sweep, store, pick="max_dice")["best"]["trial_id"] == "max"
    assert results.read_meta(sweep)["pick"] == "max_dice"
    assert sch.load(sweep / "best_schedule.yaml").meta["pick"] == "max_dice"
    assert main(best) == 0 and sch.load(out).meta["trial_id"] == "max" and sch.load(out).meta["pick"] == "max_dice"
    assert tuner.export(sweep, sweep, store)["pareto"]["pick"] == "max_dice"  # a later export keeps to it
    assert main([*best, "--pick", "knee"]) == 0 and sch.load(out).meta["trial_id"] == "knee"  # --pick still rules
    # an export elsewhere writes its own rule there and in the store, and leaves the sweep folder's as it was
    assert tuner.export(sweep, tmp_path / "x", store, pick="cheapest_within=0.1")["best"]["trial_id"] == "cheap"
    assert results.read_meta(sweep)["pick"] == "max_dice"
    assert main(best) == 0 and sch.load(out).meta["trial_id"] == "cheap"
    # another sweep exported with another rule: the front of both is picked by knee, and a note says why
    export_sweep(tmp_path / "q", sweep_meta(tmp_path / "q", "q", objective={"type": "pareto", "pick": "max_dice"}),
                 front_records()[1:], store)
    capsys.readouterr()
    assert main(best) == 0 and sch.load(out).meta["pick"] == "knee"
    err = capsys.readouterr().err
    assert "different pick rules, cheapest_within=0.1 (p); max_dice (q)" in err and "--sweep NAME" in err, err
    # a store written before the rule was recorded: knee, as before
    for part in store.glob("*/*/part-0.parquet"):
        pq.write_table(pq.read_table(part).drop_columns([results.PICK]), part)
    assert main([*best, "--sweep", "p"]) == 0 and sch.load(out).meta["trial_id"] == "knee"
    assert "different pick rules" not in capsys.readouterr().err
    # a damaged record is named, in one line
    meta = results.read_meta(sweep)
    results.write_meta(sweep, {**meta, "pick": "best"})
    with pytest.raises(PgpsError, match=r"malformed fields \(pick\)"):
        results.read_meta(sweep)


def test_best_checks_the_json_of_the_rows_it_ranks_and_names_a_damaged_one(tmp_path, capsys):
    # the JSON cells of a dataset's 100,000 rows are parsed only where 'best' uses them: a damaged cell of a
    # stopped trial does not hold it up, one of a ranked trial is refused naming its folder and trial
    store = tmp_path / "store"
    stopped = replace(record("t2", 0.9), last_result={**record("t2", 0.9).last_result, "completed": False})
    export_sweep(tmp_path / "e", sweep_meta(tmp_path / "e"), [record("t1", 0.6), stopped], store)
    part = store / "dataset=synthetic" / "sweep=demo" / "part-0.parquet"
    table = pq.read_table(part)

    def damage(trial: str, column: str, text: str) -> None:
        cells = [text if t == trial else c for t, c in zip(table["trial_id"].to_pylist(), table[column].to_pylist())]
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(cells)), part)

    damage("t2", "params", "{")
    assert results.best_schedule("synthetic", store).meta["trial_id"] == "t1"
    for column, text, needle in [("params", "{", "params column is not valid JSON"),
                                 ("schedule", "[1]", "schedule column is a JSON list"),
                                 ("dice_per_class", "[" * 1000 + "]" * 1000,
                                  "dice_per_class column is not valid JSON (nested")]:
        damage("t1", column, text)
        assert main(["best", "--dataset", "synthetic", "--results-store", str(store)]) == 2
        err = one_line(capsys)
        assert f"results store folder {part.parent}: trial t1's {needle}" in err and "move that folder" in err, err
    damage("t2", "final_patch", "[16, 16")  # printed by 'best' and its notes: every row's is checked, once a sweep
    assert main(["best", "--dataset", "synthetic", "--results-store", str(store)]) == 2
    assert "trial t2's final_patch column '[16, 16' is not a final patch (a JSON list of 3 sizes)" in one_line(capsys)


def test_a_table_of_many_batches_is_read_into_memory_once(tmp_path, monkeypatch):
    # read_parquet keeps strings as dictionaries to count what they decode to; a batch's dictionary holds every
    # value read before it, so batches kept whole took memory quadratic in the rows (100,000 trials: 2.1 GB)
    monkeypatch.setattr(results, "_PARQUET_BATCH", 4)
    path = tmp_path / "trials.parquet"
    texts = [f"{i:04d}" + "x" * 1000 for i in range(400)]  # each trial its own schedule, as a real sweep's
    pq.write_table(pa.table({"trial_id": [str(i) for i in range(400)], "schedule": texts}), path)
    held, count = [], results._decoded_bytes  # what arrow holds as each batch arrives
    monkeypatch.setattr(results, "_decoded_bytes", lambda b: held.append(pa.total_allocated_bytes()) or count(b))
    before = pa.total_allocated_bytes()
    table = results.read_parquet(path, ["trial_id", "schedule"], str(path), "fix")
    assert table["schedule"].to_pylist() == texts and table.schema.field("schedule").type == pa.string()
    assert max(held) - before < 20 * table.nbytes  # about 6 times (the reader's buffers); kept whole, 100 times


def test_best_carries_the_nnunet_plans_its_sweep_was_tuned_on_as_export_does(tmp_path, capsys):
    # the store kept nothing of sweep.json's nnunet record, so the schedule 'best' wrote could not be compared by
    # nnunet-train (export's best_schedule.yaml could); a store written before the column reads without it
    store, tuned = tmp_path / "store", {"plans": "/p/nnUNetPlans.json", "configuration": "3d_lowres",
                                        "spacing": [6.0, 1.4, 1.6], "trainer": "pgps_tune"}
    export_sweep(tmp_path / "nn", sweep_meta(tmp_path / "nn", "nn", nnunet=tuned), [record("t1", 0.6)], store)
    assert results.best_schedule("synthetic", store).meta["nnunet"] == tuned
    assert sch.load(tmp_path / "nn" / "best_schedule.yaml").meta["nnunet"] == tuned
    part = store / "dataset=synthetic" / "sweep=nn" / "part-0.parquet"
    table = pq.read_table(part)
    pq.write_table(table.drop_columns([results.TUNED_ON]), part)  # an older store
    assert "nnunet" not in results.best_schedule("synthetic", store).meta
    assert load_store(store)[results.TUNED_ON].to_pylist() == [""]
    pq.write_table(table.set_column(table.schema.get_field_index(results.TUNED_ON), results.TUNED_ON,
                                    pa.array(['{"spacing": [1, 1, 1]}'])), part)
    assert main(["best", "--dataset", "synthetic", "--results-store", str(store)]) == 2
    assert (f"results store folder {part.parent}: trial t1's nnunet column '{{\"spacing\": [1, 1, 1]}}' is not the "
            "record of nnU-Net plans pgps-tune writes there; move that folder" in one_line(capsys))


def test_warm_start_and_best_tell_trials_of_nnunet_data_at_another_spacing(tmp_path, capsys):
    # budget.trainer nnunet: the space key holds the budget, not the plans, so a sweep of 3d_fullres was seeded
    # with the scores of one of 3d_lowres (one patch and network, coarser data), and 'best' ranked them together
    # without a note; pgps-tune's trainer prepares its own data whatever the configuration, and rows stored before
    # the record are kept
    store = tmp_path / "store"
    full = {"plans": "/p/nnUNetPlans.json", "plans_name": "nnUNetPlans", "configuration": "3d_fullres",
            "trainer": "nnunet", "spacing": [3.0, 0.7, 0.8], "normalization": ["ZScoreNormalization"]}
    low = {**full, "configuration": "3d_lowres", "spacing": [6.0, 1.4, 1.6]}
    for name, tuned, tid, dice in (("low", low, "t1", 0.7), ("full", full, "t2", 0.6), ("old", None, "t3", 0.5)):
        meta = sweep_meta(tmp_path / name, name, space_key="k", **({"nnunet": tuned} if tuned else {}))
        export_sweep(tmp_path / name, meta, [record(tid, dice)], store)
    capsys.readouterr()
    assert results.best_schedule("synthetic", store, sweeps=["low", "full"]).meta["nnunet"] == low
    err = capsys.readouterr().err
    assert ("data ?, split ?/?, nnU-Net's data at spacing 6x1.4x1.6 (ZScoreNormalization)), was ranked with sweeps "
            "of another budget, data or final patch, whose scores do not compare: full (data); rank" in err), err

    def found(tuned):
        return sorted(r["sweep"] for r in results.stored_trials("synthetic", "k", [16, 16, 16], store, tuned=tuned))

    assert found(full) == ["full", "old"] and found(low) == ["low", "old"]
    assert found({**full, "trainer": "pgps_tune"}) == found(None) == ["full", "low", "old"]
    (store / "dataset=synthetic" / "sweep=old" / "part-0.parquet").unlink()
    (store / "dataset=synthetic" / "sweep=full" / "part-0.parquet").unlink()
    with pytest.raises(PgpsError, match=r"\(key k\) on these data \(those of 3d_lowres of nnUNetPlans trained "
                                        "nnU-Net's data at another spacing or normalisation\\); run a sweep"):
        found(full)
