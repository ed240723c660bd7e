"""The prepare stage on crafted bad MIDI (tests/badmidi.py) mixed with real valid files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from musegen.apps.cli import app
from musegen.config import ParamsError, load_section
from musegen.stages import prepare as stage
from tests import badmidi

ROOT = Path(__file__).resolve().parents[1]
# 300 kB is badmidi's too_large case; the limit sits below it (the default 16 MB would need a
# 16 MB fixture). Everything else is params.yaml's prepare section as committed.
TEST_MB = 0.25

#: case -> (reason, words the detail must contain); "" = ok.
EXPECTED = {
    "valid_piece": ("", ""),
    "valid_piece_2": ("", ""),
    "pop1k7_example": ("", ""),
    "three_four": ("", ""),
    "many_tempo_changes": ("", ""),
    "tpb_96": ("", ""),
    "tpb_10080": ("", ""),
    "with_drums": ("", ""),
    "empty": ("empty_file", "0 bytes"),
    "random_bytes": ("not_midi", "expected 'MThd' header"),
    "text_file": ("not_midi", "found b'Line'"),
    "truncated": ("truncated", "ends inside a chunk"),
    "header_only": ("header_only", "only an MThd header"),
    "corrupt_track": ("corrupt", "unsupported status byte: 0xf5"),
    "no_notes": ("no_notes", "no notes in 2 track(s)"),
    "few_notes": ("no_notes", "3 notes, fewer than prepare.min_notes=8"),
    "drums_only": ("drums_only", "only drum notes (32 on channel 10)"),
    "format_2": ("format_2", "format 2"),
    "zero_division": ("zero_division", "0 ticks per beat"),
    "smpte_division": ("smpte_division", "SMPTE"),
    "ten_hour_note": ("too_long", "lasts 10.00 h (36000 s), over prepare.max_seconds=3600"),
    "too_large": ("too_large", "0.30 MB is over prepare.max_file_mb=0.25"),
    "duplicate": ("duplicate", "same bytes as valid_piece.mid"),
    "reencoded": ("duplicate", "same notes (a re-encoding) as valid_piece.mid"),
}


def make_params(**changes) -> stage.PrepareParams:
    """params.yaml's prepare section (so the dataclass must match it) with test overrides."""
    base = load_section(stage.PrepareParams, "prepare", ROOT / "params.yaml")
    return dataclasses.replace(base, **{"max_file_mb": TEST_MB, "num_workers": 1, **changes})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A raw folder holding every badmidi case; returns it and {case: relative path}."""
    raw = tmp_path_factory.mktemp("prep") / "raw"
    paths = badmidi.make_all(raw)
    assert set(paths) == set(EXPECTED), "every badmidi case needs an expectation here"
    return raw, {case: p.relative_to(raw).as_posix() for case, p in paths.items()}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    out = tmp_path_factory.mktemp("prep_out")
    return stage.prepare(corpus[0], out, make_params()), out


def row(manifest: pd.DataFrame, path: str) -> pd.Series:
    match = manifest[manifest.path == path]
    assert len(match) == 1, f"{path}: expected one manifest row, found {len(match)}"
    return match.iloc[0]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_case_gets_its_status_reason_and_detail(case, corpus, prepared):
    reason, words = EXPECTED[case]
    r = row(prepared[0], corpus[1][case])
    assert (r.status, r.reason) == ("ok" if not reason else "rejected", reason), r.detail
    assert words in r.detail
    if reason:
        assert r.split == ""
    else:
        assert r.split in stage.SPLITS
        assert r.detail == ""
    if r.reason == "too_large":  # rejected unread: not even hashed (a sparse 1 TB file)
        assert r.sha256 == ""
    else:
        assert r.sha256 == hashlib.sha256((corpus[0] / r.path).read_bytes()).hexdigest()


def test_one_row_per_file_in_sorted_order(corpus, prepared):
    manifest = prepared[0]
    assert list(manifest.columns) == list(stage.COLUMNS)
    assert manifest.path.tolist() == sorted(corpus[1].values())
    assert set(manifest.reason) <= {"", *stage.REASONS}


def test_row_facts_and_notes(corpus, prepared):
    m, paths = prepared[0], corpus[1]
    pop = row(m, paths["pop1k7_example"])  # research/data.md: 930 notes, 79 s, 68 tempi
    assert (pop.n_notes, pop.n_tracks, pop.n_tempo_changes, pop.ticks_per_beat) == (930, 3, 68, 480)
    assert pop.seconds == pytest.approx(79.0, abs=0.05)
    assert pop.notes == "tempo changes: 68"
    waltz = row(m, paths["three_four"])
    assert (waltz.time_signature, waltz.n_time_signatures) == ("3/4", 1)
    assert waltz.notes == "non-4/4 (3/4): tokenized on a 4/4 grid"
    assert row(m, paths["many_tempo_changes"]).notes == "tempo changes: 64"
    assert row(m, paths["with_drums"]).notes == "drum notes dropped: 16"
    for tpb in (96, 10080):
        r = row(m, paths[f"tpb_{tpb}"])
        assert (r.ticks_per_beat, r.n_notes, r.n_bars) == (tpb, 32, 4)  # 32 eighths = 4 bars
        assert r.notes == f"rescaled from {tpb} to 480 ticks per beat"
    # 10 h at 120 bpm = 72,000 beats = 18,000 bars of 4/4, from the tempo map alone
    long = row(m, paths["ten_hour_note"])
    assert (long.n_notes, long.seconds, long.n_bars) == (1, 36000.0, 18000)
    assert pd.isna(row(m, paths["smpte_division"]).ticks_per_beat)


def test_summary_json_and_text(prepared):
    manifest, out = prepared
    summary = json.loads((out / "summary.json").read_text())
    ok = manifest[manifest.status == "ok"]
    assert summary["files"] == len(manifest) == len(EXPECTED)
    assert summary["status"] == {"ok": len(ok), "rejected": len(manifest) - len(ok)}
    assert list(summary["reason"]) == list(stage.REASONS)
    assert summary["reason"]["duplicate"] == 2
    assert summary["reason"]["no_notes"] == 2
    assert sum(summary["split"].values()) == len(ok)
    text = stage.summarize(manifest)
    assert text.startswith(f"prepare: {len(EXPECTED)} files, {len(ok)} ok (")
    assert "no_notes 2" in text and "duplicate 2" in text
    assert "empty.mid: empty_file: the file has 0 bytes" in text  # the file is named
    assert "and 6 more (see manifest.csv)" in text  # 16 rejected, 10 listed


def test_manifest_round_trips_and_is_byte_identical_on_rerun(corpus, prepared, tmp_path):
    manifest, out = prepared
    pd.testing.assert_frame_equal(stage.read_manifest(out / "manifest.csv"), manifest)
    again = stage.prepare(corpus[0], tmp_path, make_params())
    for name in ("manifest.csv", "summary.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    pd.testing.assert_frame_equal(again, manifest)


def test_parallel_workers_give_the_same_bytes(corpus, prepared, tmp_path):
    stage.prepare(corpus[0], tmp_path, make_params(num_workers=2))
    assert (tmp_path / "manifest.csv").read_bytes() == (prepared[1] / "manifest.csv").read_bytes()


def test_split_depends_only_on_own_hash(tmp_path):
    raw = tmp_path / "raw"
    first = [badmidi.valid_piece(raw, f"a{i:02d}.mid", seed=i) for i in range(12)]
    params = make_params(valid_percent=30, test_percent=30)  # big bands: all three splits occur
    before = stage.prepare(raw, tmp_path / "out1", params).set_index("path").split
    assert set(before) == set(stage.SPLITS)
    for i in range(12, 30):
        badmidi.valid_piece(raw, f"b{i:02d}.mid", seed=i)
    first[0].unlink()
    after = stage.prepare(raw, tmp_path / "out2", params).set_index("path").split
    common = before.index.intersection(after.index)
    assert len(common) == 11
    assert after[common].equals(before[common])


def test_split_percentages_and_monotone_bands():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    splits = pd.Series([stage.split_of(h, 5, 10) for h in hashes])
    share = splits.value_counts(normalize=True)
    assert share["valid"] == pytest.approx(0.05, abs=0.015)
    assert share["test"] == pytest.approx(0.10, abs=0.02)
    # growing valid_percent only moves train files into valid; test keeps every file
    wider = pd.Series([stage.split_of(h, 8, 10) for h in hashes])
    moved = splits != wider
    assert set(splits[moved]) == {"train"} and set(wider[moved]) == {"valid"}


def test_bookkeeping_skipped_every_other_file_reported(tmp_path):
    raw = tmp_path / "raw"
    badmidi.valid_piece(raw)
    (raw / ".gitignore").write_text("/x\n")
    (raw / ".DS_Store").write_bytes(b"\0\1")
    (raw / "piece.dvc").write_text("outs: []\n")
    (raw / "manifest.json").write_text("{}\n")  # musegen corpus build's record: skipped
    (raw / "old" / "manifest.json").parent.mkdir()
    (raw / "old" / "manifest.json").write_text("{}\n")  # not at the top: a stray file
    (raw / ".dvc").mkdir()
    (raw / ".dvc" / "config").write_text("[core]\n")
    bak = badmidi.valid_piece(raw, "old/valid_piece.mid.bak", seed=7)
    (raw / "loop").symlink_to(raw, target_is_directory=True)  # a cycle must not hang the walk
    (raw / "broken.mid").symlink_to(raw / "gone.mid")
    m = stage.prepare(raw, tmp_path / "out", make_params())
    assert m.path.tolist() == [
        "broken.mid",
        "old/manifest.json",
        "old/valid_piece.mid.bak",
        "valid_piece.mid",
    ]
    assert row(m, "old/manifest.json").reason == "not_midi"
    r = row(m, "old/valid_piece.mid.bak")
    assert (r.status, r.notes) == ("ok", "unexpected extension '.bak'")
    broken = row(m, "broken.mid")  # a dangling link: reported, not a crash
    assert (broken.status, broken.reason, broken.detail) == (
        "rejected",
        "missing",
        "a link to nothing",
    )
    assert bak.exists()


def test_zero_tempo_is_corrupt_not_a_crash(tmp_path):
    events = [(0, b"\xff\x51\x03\x00\x00\x00"), *badmidi.notes(range(60, 72), 480, 240)]
    badmidi._write(tmp_path, "zero_tempo.mid", badmidi.smf([badmidi.track(events)], fmt=0))
    r = stage.check_file(tmp_path, "zero_tempo.mid", make_params())
    assert (r["status"], r["reason"]) == ("rejected", "corrupt")
    assert "ZeroDivisionError" in r["detail"]


def test_ten_hour_note_costs_no_memory_per_tick(tmp_path):
    badmidi.ten_hour_note(tmp_path)
    params = make_params()
    stage.check_file(tmp_path, "ten_hour_note.mid", params)  # warm imports outside the trace
    tracemalloc.start()
    r = stage.check_file(tmp_path, "ten_hour_note.mid", params)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert r["reason"] == "too_long"
    # a per-tick array (pretty_midi's tick->time map) would need 34.56M x 8 B = 276 MB
    assert peak < 1_000_000, f"peak {peak} bytes"


def test_too_large_file_is_never_read_whole(tmp_path):
    path = badmidi.too_large(tmp_path, 4_000_000)
    params = make_params(max_file_mb=1)
    tracemalloc.start()
    r = stage.check_file(tmp_path, path.name, params)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (r["reason"], r["bytes"]) == ("too_large", 4_000_000)
    assert r["sha256"] == ""  # never read: neither parsed nor hashed
    assert peak < 500_000, f"peak {peak} bytes for a 4 MB file"
    assert stage.check_file(tmp_path, path.name, make_params(max_file_mb=5))["status"] == "ok"


def test_bad_params_and_missing_folder_are_named(tmp_path):
    with pytest.raises(ParamsError, match="valid_percent and test_percent"):
        make_params(valid_percent=60, test_percent=40)
    with pytest.raises(ParamsError, match="num_workers must be >= 0"):
        make_params(num_workers=-1)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: raw MIDI folder not found"):
        stage.prepare(tmp_path / "nope", tmp_path / "out", make_params())
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".keep").write_text("")
    with pytest.raises(FileNotFoundError, match="no files to prepare"):
        stage.prepare(tmp_path / "hidden", tmp_path / "out", make_params())


def test_cli_strict_exits_1_and_still_writes_summary(corpus, tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(max_file_mb=TEST_MB, num_workers=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    raw = tmp_path / "raw"
    shutil.copytree(corpus[0], raw)
    args = ["prepare", "--raw", str(raw), "--params", str(tmp_path / "params.yaml")]
    strict = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a"), "--strict"])
    assert strict.exit_code == 1, strict.output
    assert "--strict: 16 file(s) rejected; see the manifest" in strict.output
    assert "prepare: 24 files, 8 ok" in strict.output
    assert (tmp_path / "a" / "summary.json").exists()
    lenient = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert lenient.exit_code == 0, lenient.output
    assert (tmp_path / "b" / "manifest.csv").read_bytes() == (
        tmp_path / "a" / "manifest.csv"
    ).read_bytes()


@pytest.mark.slow
def test_real_pieces_are_all_kept(request, tmp_path):
    """The corpus stage's real pieces (conftest) and the Pop1K7 example all pass prepare."""
    pytest.importorskip("music21")
    raw = request.getfixturevalue("real_midi_dir")  # built by musegen.stages.corpus (about 30 s)
    m = stage.prepare(raw, tmp_path, make_params(num_workers=0))
    assert "manifest.json" not in set(m.path)
    assert (m.status == "ok").all(), m[m.status != "ok"][["path", "reason", "detail"]]
    assert sorted(m.path) == sorted(p.name for p in raw.glob("*.mid"))
    assert m.seconds.gt(0).all() and m.n_notes.ge(make_params().min_notes).all()
    assert m.notes.str.contains("non-4/4").any()  # the 2/4 rag and the 3/4 mazurka
