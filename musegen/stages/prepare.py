"""The `prepare` stage: validate every file under the raw folder and write the manifest.

Every regular file under `raw_dir` (recursively, following directory links once) becomes one
row of `manifest.csv`, whatever its extension: a stray `.txt` or `.mid.bak` is reported, not
skipped. Only bookkeeping is left out: hidden names (a leading dot: `.gitignore`, `.dvcignore`,
`.DS_Store`, `.dvc/`), DVC pointer files (`*.dvc`) and the `manifest.json` that
`musegen corpus build` writes at the top of the corpus folder.

A row is `ok` or `rejected` with a reason code (REASONS):

- read_header / load_midi (musegen.core.midi): not_midi, empty_file, truncated, corrupt, format_2,
  smpte_division, zero_division; `header_only` (an MThd chunk and nothing else) is split off
  `truncated` here.
- too_large: size checked on the opened descriptor before anything is read (neither parsed
  nor hashed), and the read itself is bounded, so memory stays bounded.
- missing, not_regular, unreadable (musegen.files.open_regular, the one safe read): a
  dangling link; a FIFO, device, socket or a link to one (never opened, so nothing blocks or
  streams forever); a file or folder without read permission. A folder that cannot be listed
  is one row (its path ends in "/"), so the files in it are never dropped silently.
- drums_only / no_notes: no pitched notes, or fewer than `min_notes`.
- too_long: seconds from the tempo map (O(tempo changes), nothing per tick), over
  `max_seconds`; a single 10-hour note costs as little as a short one.
- duplicate: same bytes (sha256), or the same notes re-encoded (notes_sha256), as an ok file
  earlier in sorted path order; the detail names the kept file.
- corrupt: also any unexpected exception while checking a file (its text is the detail).

Accepted with a note in the `notes` column: non-4/4 time signatures (the CP grid is 4/4 bars
of 1920 ticks, as in Pop1K7, so such pieces are tokenized on a 4/4 grid), tempo changes
(Pop1K7 has one per beat; tempo is a token field), resolutions other than 480 ticks per beat
(rescaled by musegen.core.midi.to_score), dropped drum notes and unexpected extensions.

Splits come from each file's own sha256 (valid at the bottom of the hash range, test at the
top), so adding or removing files never moves another file, and growing `valid_percent` only
moves train files into valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from musegen import files, paths
from musegen.config import DataParams, ParamsError, StageConfig
from musegen.core import midi
from musegen.core.midi import TICKS_PER_BEAT, MidiError

REASONS = (*midi.REASONS, *(r for r in ("header_only",) if r not in midi.REASONS))
SPLITS = ("train", "valid", "test")
MIDI_SUFFIXES = (".mid", ".midi", ".smf", ".kar")
CORPUS_BOOKKEEPING = (paths.CORPUS_MANIFEST,)  # musegen.stages.corpus's own record, top level only

COLUMNS = (
    "path",  # relative to raw_dir, POSIX, as files.printable text (a non-UTF-8 byte is \xNN)
    "sha256",
    "bytes",
    "status",  # ok | rejected
    "reason",  # one of REASONS, empty when ok
    "detail",
    "split",  # train | valid | test for ok rows, empty otherwise
    "n_notes",  # pitched notes (drums excluded)
    "n_drum_notes",
    "seconds",  # last note off, from the tempo map
    "n_bars",  # 1920-tick bars at 480 ticks per beat
    "n_tracks",  # MTrk chunks the header announces
    "ticks_per_beat",  # the file's own resolution
    "time_signature",  # the first one, "4/4" when the file has none (the MIDI default)
    "n_time_signatures",
    "n_tempo_changes",
    "notes_sha256",  # hash of the note table at 480 ticks per beat (catches re-encodings)
    "notes",  # warnings for accepted oddities, "; "-separated
)
INT_COLUMNS = (
    "bytes",
    "n_notes",
    "n_drum_notes",
    "n_bars",
    "n_tracks",
    "ticks_per_beat",
    "n_time_signatures",
    "n_tempo_changes",
)


@dataclasses.dataclass(frozen=True)
class PrepareParams:
    """The `prepare` section of params.yaml (see the comments there)."""

    max_file_mb: float
    max_seconds: float
    min_notes: int
    valid_percent: float
    test_percent: float
    num_workers: int
    use_strict: bool

    def __post_init__(self) -> None:
        problems = []
        if self.max_file_mb <= 0 or self.max_seconds <= 0:
            problems.append("prepare.max_file_mb and prepare.max_seconds must be > 0")
        if self.min_notes < 1:
            problems.append(f"prepare.min_notes must be >= 1, found {self.min_notes}")
        if min(self.valid_percent, self.test_percent) < 0 or (
            self.valid_percent + self.test_percent >= 100
        ):
            problems.append("prepare.valid_percent and test_percent must be >= 0 and sum < 100")
        if self.num_workers < 0:
            problems.append(
                f"prepare.num_workers must be >= 0 (0 = all cores), found {self.num_workers}"
            )
        if problems:
            raise ParamsError("; ".join(problems) + " (fix params.yaml)")


def list_files(raw_dir: Path) -> list[str]:
    """Relative paths of every data file under raw_dir, sorted (see module docstring).

    A folder that cannot be listed (no read permission, I/O error) is an entry too, its path
    ending in "/", so the files in it are reported missing instead of silently dropped. Names
    are the OS's (surrogate-escaped where not UTF-8); `files.printable` turns them into text.

    Raises:
        FileNotFoundError: raw_dir itself cannot be listed.
    """
    found, seen_dirs, unlistable = [], set(), []
    for root, dirs, names in os.walk(raw_dir, followlinks=True, onerror=unlistable.append):
        real = os.path.realpath(root)
        if real in seen_dirs:  # a directory link back up the tree: walk each folder once
            dirs.clear()
            continue
        seen_dirs.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_root = Path(root).relative_to(raw_dir)
        top = rel_root == Path()
        found += [
            (rel_root / n).as_posix()
            for n in names
            if not (n.startswith(".") or n.endswith(".dvc") or (top and n in CORPUS_BOOKKEEPING))
        ]
    for exc in unlistable:
        rel = Path(exc.filename).relative_to(raw_dir)
        if rel == Path():
            raise FileNotFoundError(f"{raw_dir}: cannot list the folder ({exc.strerror})")
        found.append(rel.as_posix() + "/")
    return sorted(found)


def _check(path: Path, row: dict[str, Any], params: PrepareParams) -> None:
    """Fill `row` with what the file holds; raise MidiError when it must be rejected."""
    max_bytes = int(params.max_file_mb * 1e6)
    try:  # the one safe read: regular files only, size checked on the opened descriptor
        with files.open_regular(path) as (fh, size):
            row["bytes"] = size
            if size > max_bytes:  # rejected unread: neither parsed nor hashed (a sparse 1 TB file)
                raise MidiError(
                    path,
                    "too_large",
                    f"{size / 1e6:.2f} MB is over prepare.max_file_mb={params.max_file_mb}; "
                    "drop the file or raise the limit",
                )
            data = fh.read(max_bytes + 1)  # bounded even if the file grows meanwhile
    except files.FileRefusedError as exc:
        raise MidiError(path, exc.reason, exc.detail) from exc
    except OSError as exc:  # EIO and the like while reading
        raise MidiError(path, "unreadable", f"cannot read: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise MidiError(path, "too_large", f"grew past prepare.max_file_mb={params.max_file_mb}")
    row["sha256"] = hashlib.sha256(data).hexdigest()
    if data.startswith(b"MThd") and len(data) >= 14:  # header facts, even for rejected files
        row["n_tracks"], division = struct.unpack(">HH", data[10:14])
        row["ticks_per_beat"] = None if division & 0x8000 else division  # SMPTE: not ticks/beat
    try:
        midi.read_header(data, path)
    except MidiError as exc:
        # read_header calls a complete MThd with nothing after it (or 0 tracks) `truncated`;
        # it is a distinct, common export failure, so it gets its own reason here.
        if exc.reason != "truncated" or len(data) < 14:
            raise
        if row["n_tracks"] and len(data) > 8 + int.from_bytes(data[4:8], "big"):
            raise
        row["reason"] = "header_only"
        row["detail"] = f"only an MThd header ({row['n_tracks']} track(s) announced), no MTrk data"
        return
    # symusic (C++), the parser tokenize uses: ~18 MB of memory and ~0.3 s per MB of dense MIDI
    # (miditoolkit took ~85 MB and ~6.5 s per MB; see README). Tempos sorted for the timing.
    score = midi.parse_score(data, path)
    score = dataclasses.replace(score, tempos=sorted(score.tempos))
    seconds = score.seconds()
    sigs = [f"{n}/{d}" for _, n, d in sorted(score.time_signatures)]
    row.update(
        n_notes=len(score.notes),
        n_drum_notes=score.n_drum_notes,
        seconds=round(seconds, 3),
        n_bars=-(-score.end_tick // midi.BAR_TICKS),
        time_signature=sigs[0] if sigs else "4/4",
        n_time_signatures=len(sigs),
        n_tempo_changes=len(score.tempos),
        notes_sha256=hashlib.sha256(score.notes.tobytes()).hexdigest(),
    )
    notes = []
    if odd := sorted({s for s in sigs if s != "4/4"}):
        notes.append(f"non-4/4 ({', '.join(odd)}): tokenized on a 4/4 grid")
    if len(score.tempos) > 1:
        notes.append(f"tempo changes: {len(score.tempos)}")
    if score.source_ticks_per_beat != TICKS_PER_BEAT:
        notes.append(f"rescaled from {score.source_ticks_per_beat} to 480 ticks per beat")
    if score.n_drum_notes and len(score.notes):
        notes.append(f"drum notes dropped: {score.n_drum_notes}")
    if not path.name.lower().endswith(MIDI_SUFFIXES):
        notes.append(f"unexpected extension {path.suffix or '(none)'!r}")
    row["notes"] = "; ".join(notes)

    if len(score.notes) == 0:
        if score.n_drum_notes:
            raise MidiError(
                path,
                "drums_only",
                f"only drum notes ({score.n_drum_notes} on channel 10), no pitched notes",
            )
        raise MidiError(path, "no_notes", f"no notes in {row['n_tracks']} track(s)")
    if seconds > params.max_seconds:
        raise MidiError(
            path,
            "too_long",
            f"lasts {seconds / 3600:.2f} h ({seconds:.0f} s), over prepare.max_seconds="
            f"{params.max_seconds}; check its tempo map and note lengths",
        )
    if len(score.notes) < params.min_notes:
        raise MidiError(
            path,
            "no_notes",
            f"{len(score.notes)} notes, fewer than prepare.min_notes={params.min_notes}",
        )


def check_file(raw_dir: Path, rel: str, params: PrepareParams) -> dict[str, Any]:
    """Validate one file; never raises: every outcome is a manifest row (dict of COLUMNS)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    # the path as printable text (files.printable): the manifest is UTF-8 whatever the names
    row.update(dict.fromkeys((*INT_COLUMNS, "seconds")), path=files.printable(rel))
    row["status"] = "rejected"
    try:
        if rel.endswith("/"):  # list_files: a folder it could not list
            next((Path(raw_dir) / rel).iterdir(), None)  # raises the reason again
            raise MidiError(rel, "unreadable", "folder became readable during the run; re-run")
        _check(Path(raw_dir) / rel, row, params)
    except MidiError as exc:
        row.update(reason=exc.reason, detail=files.printable(exc.detail))
    except OSError as exc:  # the folder that cannot be listed
        detail = f"cannot list the folder ({exc.strerror}): the files in it are not checked"
        row.update(reason="unreadable", detail=detail)
    except Exception as exc:  # never crash on a file: anything unexpected is reported as corrupt
        row.update(reason="corrupt", detail=files.printable(f"{type(exc).__name__}: {exc}"))
    else:
        if not row["reason"]:  # header_only returns with its reason set
            row["status"] = "ok"
    return row


def split_of(sha256: str, valid_percent: float, test_percent: float) -> str:
    """The split of a file from its own hash: valid at the bottom of [0, 100), test at the top."""
    u = int(sha256[:16], 16) / 16**16 * 100  # uniform in [0, 100) for a cryptographic hash
    if u < valid_percent:
        return "valid"
    return "test" if u >= 100 - test_percent else "train"


def _mark_duplicates(rows: list[dict[str, Any]]) -> None:
    kept: dict[str, str] = {}  # sha256 or notes_sha256 -> path of the first ok file
    for row in rows:
        if row["status"] != "ok":
            continue
        same_bytes, same_notes = kept.get(row["sha256"]), kept.get(row["notes_sha256"])
        if same_bytes or same_notes:
            what = "bytes" if same_bytes else "notes (a re-encoding)"
            row.update(status="rejected", reason="duplicate")
            row["detail"] = f"same {what} as {same_bytes or same_notes}, which is kept"
            continue
        kept[row["sha256"]] = kept[row["notes_sha256"]] = row["path"]


def summary_counts(manifest: pd.DataFrame) -> dict[str, Any]:
    """Counts by status, reason and split, plus hours of ok music (summary.json)."""
    ok = manifest[manifest.status == "ok"]
    return {
        "files": len(manifest),
        "hours_ok": round(float(ok.seconds.sum()) / 3600, 3),
        "status": {s: int((manifest.status == s).sum()) for s in ("ok", "rejected")},
        "reason": {r: int((manifest.reason == r).sum()) for r in REASONS},
        "split": {s: int((ok.split == s).sum()) for s in SPLITS},
    }


def prepare(raw_dir: Path, out_dir: Path, params: PrepareParams) -> pd.DataFrame:
    """Validate every file under raw_dir; write out_dir/manifest.csv and out_dir/summary.json.

    Args:
        raw_dir: the corpus folder (walked recursively).
        out_dir: where manifest.csv and summary.json go (created if needed).
        params: the `prepare` section.

    Returns:
        The manifest, one row per file in sorted path order, columns COLUMNS.

    Raises:
        FileNotFoundError: raw_dir is missing or holds no data files.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(
            f"{raw_dir}: raw MIDI folder not found; build it (`musegen corpus build`) or pass --raw"
        )
    names = list_files(raw_dir)
    if not names:
        raise FileNotFoundError(
            f"{raw_dir}: no files to prepare (hidden and *.dvc files are skipped)"
        )
    workers = min(params.num_workers or os.cpu_count() or 1, len(names))
    check = partial(check_file, raw_dir, params=params)
    bar = partial(tqdm, total=len(names), desc=f"prepare {raw_dir}", unit="file")
    if workers == 1:
        rows = [check(rel) for rel in bar(names)]
    else:
        # forkserver, not fork: callers (Prefect, MLflow) may hold threads, which fork can deadlock
        ctx = multiprocessing.get_context("forkserver")
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                chunk = max(1, len(names) // (workers * 8))
                rows = list(bar(pool.map(check, names, chunksize=chunk)))  # map keeps order
        except BrokenProcessPool as exc:  # a worker was killed (OOM) or the parser crashed
            raise RuntimeError(
                f"{raw_dir}: a prepare worker died (out of memory or a parser crash); re-run with "
                "prepare.num_workers=1 to see the file in the progress bar, or lower "
                "prepare.max_file_mb"
            ) from exc
    _mark_duplicates(rows)
    for row in rows:
        if row["status"] == "ok":
            row["split"] = split_of(row["sha256"], params.valid_percent, params.test_percent)
    manifest = pd.DataFrame(rows, columns=list(COLUMNS))
    manifest = manifest.astype(dict.fromkeys(INT_COLUMNS, "Int64") | {"seconds": "Float64"})
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = manifest.to_csv(index=False, lineterminator="\n")
    files.write_atomic(out_dir / "manifest.csv", csv)
    counts = summary_counts(manifest)
    files.write_atomic(out_dir / "summary.json", json.dumps(counts, indent=2) + "\n")
    files.write_headline(out_dir / "summary.json", pieces=counts["status"]["ok"])
    return manifest


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest.csv back with the dtypes prepare wrote (empty strings stay empty)."""
    dtypes = dict.fromkeys(INT_COLUMNS, "Int64") | {"seconds": "Float64"}
    str_cols = [c for c in COLUMNS if c not in dtypes]
    return pd.read_csv(
        path,
        dtype=dtypes | dict.fromkeys(str_cols, str),
        keep_default_na=False,
        na_values={c: [""] for c in dtypes},
    )


def summarize(manifest: pd.DataFrame, max_listed: int = 10) -> str:
    """A short human summary: ok, rejected by reason (naming files), split sizes, hours."""
    counts = summary_counts(manifest)
    ok, rejected = counts["status"]["ok"], counts["status"]["rejected"]
    lines = [
        f"prepare: {len(manifest)} files, {ok} ok ({counts['hours_ok']:.2f} h of music), "
        f"{rejected} rejected"
    ]
    if rejected:
        by_reason = ", ".join(f"{r} {n}" for r, n in counts["reason"].items() if n)
        lines.append(f"  rejected by reason: {by_reason}")
        bad = manifest[manifest.status != "ok"]
        lines += [
            f"    {r.path}: {r.reason}: {r.detail}" for r in bad.head(max_listed).itertuples()
        ]
        if len(bad) > max_listed:
            lines.append(f"    … and {len(bad) - max_listed} more (see manifest.csv)")
    splits = counts["split"]
    lines.append("  split: " + ", ".join(f"{s} {n}" for s, n in splits.items()))
    if ok and not (splits["valid"] and splits["test"]):
        lines.append("  warning: an empty valid or test split; add files or raise *_percent")
    noted = manifest[(manifest.status == "ok") & (manifest.notes != "")]
    if len(noted):
        lines.append(f"  {len(noted)} ok file(s) with notes (non-4/4, tempo changes, …): see notes")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PrepareConfig(StageConfig):
    """What the prepare stage reads: its section and the data folders (`PrepareConfig.load`)."""

    prepare: PrepareParams
    data: DataParams


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What prepare wrote: the manifest and its counts (`summary` is `summarize`'s text)."""

    manifest: Path
    files: int
    ok: int
    rejected: int
    summary: str

    @classmethod
    def read(cls, params: PrepareConfig, root: Path | str = ".") -> PrepareResult:
        """The manifest at data.prepared_dir (in the repository at `root`)."""
        return cls.of(Path(root, params.data.manifest))

    @classmethod
    def of(cls, manifest: Path) -> PrepareResult:
        """The counts of a manifest.csv."""
        table = read_manifest(manifest)
        ok = int((table.status == "ok").sum())
        return cls(manifest, len(table), ok, len(table) - ok, summarize(table))


def run(params: PrepareConfig, raw: Path | None = None, out: Path | None = None) -> PrepareResult:
    """The prepare stage: validate data.raw_root/data.corpus (or `raw`) into
    data.prepared_dir (or `out`); see `prepare`."""
    out = Path(out or params.data.prepared_dir)
    prepare(raw or params.data.raw_dir, out, params.prepare)
    return PrepareResult.of(out / params.data.manifest.name)
