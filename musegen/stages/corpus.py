"""The raw corpora: build the embedded m21-keyboard corpus, fetch Pop1K7.

`build_m21` writes the default corpus from scores bundled with music21 (research/data.md §1):
19 keyboard, lead-sheet and voice+piano pieces plus the Riemenschneider Bach chorales, each
merged into one program-0 track named ``piano`` at 480 ticks per beat, like Pop1K7. The build is
byte-identical across runs and checked against the committed manifest ``m21_keyboard.json``.

`fetch_pop1k7` downloads the Pop1K7 archive from its Zenodo mirror (or takes an archive or
folder on disk), verifies it, and installs the ``midi_analyzed`` files atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from tqdm import tqdm

from musegen import files, paths
from musegen.config import DataParams, ParamsError, StageConfig
from musegen.core.midi import TICKS_PER_BEAT, MidiError, load_midi, to_score
from musegen.files import printable

MUSIC21_VERSION = "10.5.1"  # the committed manifest's hashes hold for this version only
M21_CORPUS = "m21-keyboard"
#: the committed manifest of a full build (see `build_m21`).
EXPECTED_MANIFEST = Path(__file__).with_name("m21_keyboard.json")

#: the non-chorale pieces, interleaved so that any prefix is varied (2/4 rag, 3/4 mazurka with
#: the repeat fallback, lead sheet, voice+piano, …). `schumann_robert/dichterliebe_no2.xml` is
#: kept and `opus48no2.mxl` (the same song) left out; `lift_every_voice` is SATB only.
M21_PIECES = (
    "joplin/maple_leaf_rag.mxl",
    "chopin/mazurka06-2.krn",
    "leadSheet/berlinAlexandersRagtime.mxl",
    "schubert/Lindenbaum.xml",
    "mozart/k545/movement1_exposition.mxl",
    "verdi/laDonnaEMobile.mxl",
    "schumann_robert/dichterliebe_no2.xml",
    "cpebach/h186.mxl",
    "leadSheet/fosterBrownHair.mxl",
    "beach/prayer_of_a_tired_child.musicxml",
    "schumann_clara/polonaise_op1n1.mxl",
    "liliuokalani/aloha_oe.mxl",
    "schoenberg/opus19/movement2.mxl",
    "johnson_j_r/lift_every_voice.mxl",
    "schumann_clara/polonaise_op1n2.mxl",
    "handel/rinaldo/Lascia_chio_pianga.mxl",
    "schumann_clara/polonaise_op1n3.mxl",
    "schoenberg/opus19/movement6.mxl",
    "schumann_clara/polonaise_op1n4.mxl",
)
#: when a chorale name matches several files, prefer MusicXML: the bach .krn files duplicate
#: .mxl ones and bwv277.krn has badly formed repeats.
_SUFFIX_PREFERENCE = (".mxl", ".xml", ".musicxml", ".krn")
_SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".abc", ".mid")

POP1K7_LAYOUT = ("midi_transcribed", "midi_synchronized", "midi_analyzed")
_CHORD = re.compile(r"^([A-G][#b]?)_([^_\s]+)_([A-G][#b]?)$")
_BPM = re.compile(r"^global_bpm_(\d+)$")
_SAMPLE = 20  # files whose format fetch_pop1k7 checks (prepare validates every file later)


class CorpusError(RuntimeError):
    """A corpus cannot be built or installed; the message names the file and the fix."""


class CorpusWarning(UserWarning):
    """A corpus file deviates from the expected format but may still be usable."""


@dataclass(frozen=True)
class CorpusResult:
    """What a corpus build wrote, read back from its manifest.json (`CorpusResult.read`)."""

    folder: Path
    files: int
    notes: int
    minutes: float

    @classmethod
    def read(cls, params: CorpusConfig, root: Path | str = ".") -> CorpusResult:
        """The m21-keyboard corpus under data.raw_root (in the repository at `root`)."""
        return cls.of(Path(root, params.data.raw_root, M21_CORPUS))

    @classmethod
    def of(cls, folder: Path | str) -> CorpusResult:
        """The counts of the corpus built in `folder` (its manifest's `files` rows)."""
        rows = json.loads(paths.corpus_manifest(folder).read_text())["files"]
        notes, seconds = sum(r["notes"] for r in rows), sum(r["seconds"] for r in rows)
        return cls(Path(folder), len(rows), notes, seconds / 60)

    def __str__(self) -> str:
        return f"{self.files} files, {self.notes:,} notes, {self.minutes:.1f} min of music"


@dataclass(frozen=True)
class CorpusParams:
    """The `corpus` section of params.yaml (built with `config.load_section`)."""

    num_workers: int  # processes for the m21-keyboard build; 0 = all cores
    max_files: int  # 0 = all; N = the first N of `m21_sources()` (small profiles)
    zenodo_api: str  # records API base URL (tests point it at a local server)
    pop1k7_record: int  # Zenodo record id of the Pop1K7 mirror
    max_entry_mb: float  # archive guard (`_Guard`): largest file taken from an archive or folder
    max_total_mb: float  # ... all files taken together
    max_entries: int  # ... members in one archive, folders and skipped files included
    max_ratio: float  # ... bytes extracted per byte of archive (a zip bomb is ~1000)

    def __post_init__(self) -> None:
        limits = (self.max_entry_mb, self.max_total_mb, self.max_entries, self.max_ratio)
        if min(limits) <= 0:
            raise ParamsError(
                "corpus.max_entry_mb, max_total_mb, max_entries and max_ratio must be > 0, "
                f"found {', '.join(map(str, limits))} (fix params.yaml)"
            )


@dataclass(frozen=True)
class CorpusConfig(StageConfig):
    """What the corpus stage reads: its section and data.raw_root (`CorpusConfig.load`)."""

    corpus: CorpusParams
    data: DataParams


def run(params: CorpusConfig) -> CorpusResult:
    """The corpus stage: build m21-keyboard into data.raw_root/m21-keyboard (`build_m21`).

    Raises:
        CorpusError: see `build_m21`.
    """
    build_m21(Path(params.data.raw_root) / M21_CORPUS, params.corpus)
    return CorpusResult.read(params)


# ---------------------------------------------------------------- m21-keyboard


def check_music21(version: str) -> None:
    """Raise CorpusError unless `version` is the music21 release the manifest was built with."""
    if version != MUSIC21_VERSION:
        raise CorpusError(
            f"{EXPECTED_MANIFEST.name}: the m21-keyboard corpus needs music21=={MUSIC21_VERSION}, "
            f"found {version} (its parser and MIDI writer change the bytes); "
            f"fix: pip install music21=={MUSIC21_VERSION}"
        )


def m21_sources() -> list[str]:
    """Every corpus path in build order: M21_PIECES, then the chorales by Riemenschneider number."""
    from music21 import corpus

    names = corpus.chorales.Iterator(numberingSystem="riemenschneider", returnType="filename")
    # 371 Riemenschneider numbers name 350 distinct chorales: skip the repeats.
    return [*M21_PIECES, *dict.fromkeys(names)]


def midi_name(source: str) -> str:
    """Output file name: ``joplin/maple_leaf_rag.mxl`` -> ``joplin__maple_leaf_rag.mid``."""
    stem = source[: -len(Path(source).suffix)] if source.endswith(_SCORE_SUFFIXES) else source
    return stem.replace("/", "__") + ".mid"


def _resolve(source: str) -> Path:
    """The one bundled file a corpus path names (music21 prefix-matches, e.g. bwv244.3 -> .32)."""
    from music21 import corpus

    found = corpus.getWork(source)
    paths = found if isinstance(found, list) else [found]
    stem = source.rsplit("/", 1)[-1]
    exact = [p for p in paths if p.name == stem or p.name[: -len(p.suffix)] == stem] or paths
    return min(exact, key=lambda p: (*_SUFFIX_PREFERENCE, p.suffix).index(p.suffix))


def _strip_repeats(score: Any) -> None:
    """Make repeat barlines regular and drop repeat marks, expressions and endings, in place.

    music21 refuses to expand badly formed repeats (ExpanderException, e.g.
    chopin/mazurka06-2.krn); the piece then plays straight through, every ending once.
    """
    from music21 import bar, repeat, spanner, stream

    for measure in score.recurse().getElementsByClass(stream.Measure):
        if isinstance(measure.leftBarline, bar.Repeat):
            measure.leftBarline = None
        if isinstance(measure.rightBarline, bar.Repeat):
            measure.rightBarline = bar.Barline("regular")
    kinds = (repeat.RepeatMark, repeat.RepeatExpression, spanner.RepeatBracket)
    for element in list(score.recurse().getElementsByClass(kinds)):
        element.activeSite.remove(element)


def _rescale(tick: int, division: int) -> int:
    """Tick at `division` per beat -> TICKS_PER_BEAT, rounding half up.

    music21 writes 10080 = 21 x 480 ticks per beat, so quarter to 64th notes and 3-, 5- and
    6-tuplets map exactly; a 7-tuplet lands between ticks and moves by < 1/960 beat.
    """
    return (tick * TICKS_PER_BEAT + division // 2) // division


def merge_to_piano(data: bytes) -> bytes:
    """Merge every non-drum note of a MIDI file into one program-0 ``piano`` track at 480 tpb.

    Tempo, time-signature and key-signature changes are kept (rescaled). Notes are sorted by
    (start, pitch, end). A single piano key sounds once at a time, so same-pitch notes are made
    monophonic: unisons struck together (chorale voices) become one note (longest end, loudest
    velocity) and a note still sounding when its pitch is struck again ends there. Any MIDI
    reader then recovers exactly the notes written.
    """
    import miditoolkit

    src = miditoolkit.MidiFile(file=io.BytesIO(data))
    div = int(src.ticks_per_beat)
    notes: dict[tuple[int, int], tuple[int, int]] = {}  # (start, pitch) -> (end, velocity)
    for inst in src.instruments:
        if inst.is_drum:
            continue
        for n in inst.notes:
            start, end = _rescale(n.start, div), _rescale(n.end, div)
            key = (start, int(n.pitch))
            old_end, old_vel = notes.get(key, (0, 0))
            notes[key] = (max(end, start + 1, old_end), max(int(n.velocity), old_vel))
    merged, last_by_pitch = [], {}
    for start, pitch in sorted(notes, key=lambda k: (k[1], k[0])):  # per pitch, by onset
        end, velocity = notes[start, pitch]
        prev = last_by_pitch.get(pitch)
        if prev is not None and prev.end > start:
            prev.end = start  # re-struck: the earlier note stops here
        last_by_pitch[pitch] = note = miditoolkit.Note(velocity, pitch, start, end)
        merged.append(note)
    merged.sort(key=lambda n: (n.start, n.pitch, n.end))

    out = miditoolkit.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    out.instruments = [miditoolkit.Instrument(program=0, is_drum=False, name="piano")]
    out.instruments[0].notes = merged
    # keep the last event of each kind at a tick (music21 repeats them per part)
    tempos = {_rescale(t.time, div): t.tempo for t in src.tempo_changes}
    out.tempo_changes = [miditoolkit.TempoChange(tempos[t], t) for t in sorted(tempos)]
    sigs = {_rescale(s.time, div): (s.numerator, s.denominator) for s in src.time_signature_changes}
    out.time_signature_changes = [miditoolkit.TimeSignature(*sigs[t], t) for t in sorted(sigs)]
    keys = {_rescale(k.time, div): k.key_name for k in src.key_signature_changes}
    out.key_signature_changes = [miditoolkit.KeySignature(keys[t], t) for t in sorted(keys)]
    buf = io.BytesIO()
    out.dump(file=buf)
    return buf.getvalue()


def _build_one(job: tuple[str, str]) -> dict[str, Any]:
    """Parse one corpus path, write its merged MIDI to the job's folder, return its manifest row."""
    from music21 import converter, midi, repeat, stream

    source, out_dir = job
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # music21's encoding warnings are not actionable here
        # forceSource: a cached pickle parse writes different MIDI (data.md pitfalls)
        score = converter.parse(_resolve(source), forceSource=True)
        if isinstance(score, stream.Opus):
            score = score.scores[0]
        try:
            data = midi.translate.streamToMidiFile(score).writestr()
        except repeat.ExpanderException:
            _strip_repeats(score)
            data = midi.translate.streamToMidiFile(score).writestr()
    data = merge_to_piano(data)
    path = Path(out_dir) / midi_name(source)
    path.write_bytes(data)
    score_ = to_score(load_midi(path))
    return {
        "file": path.name,
        "source": source,
        "notes": len(score_.notes),
        "seconds": round(score_.seconds(), 3),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _verify(rows: list[dict[str, Any]], built: Path, full: bool) -> str:
    """Compare the build's sha256 with the committed manifest; raise listing every mismatch.

    Returns:
        A word for the summary line: ``verified`` or ``NOT verified``.
    """
    if not EXPECTED_MANIFEST.is_file():
        warnings.warn(
            f"{EXPECTED_MANIFEST}: missing, build not verified; after a full build with "
            f"music21=={MUSIC21_VERSION}, copy {built} there and commit it",
            CorpusWarning,
            stacklevel=3,
        )
        return "NOT verified"
    expected = json.loads(EXPECTED_MANIFEST.read_text())
    want = {r["file"]: r["sha256"] for r in expected["files"]}
    bad = [
        f"{r['file']}: expected {want[r['file']][:12]}…, built {r['sha256'][:12]}…"
        if r["file"] in want
        else f"{r['file']}: not in the committed manifest"
        for r in rows
        if want.get(r["file"]) != r["sha256"]
    ]
    if full:
        bad += [
            f"{f}: in the committed manifest, not built"
            for f in sorted(set(want) - {r["file"] for r in rows})
        ]
    if bad:
        import miditoolkit

        shown = "\n  ".join(bad[:20]) + (f"\n  … and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise CorpusError(
            f"{built}: {len(bad)} file(s) differ from {EXPECTED_MANIFEST}:\n  {shown}\n"
            f"likely cause: other library versions (committed: {expected['versions']}, this build: "
            f"music21 {MUSIC21_VERSION}, miditoolkit {miditoolkit.__version__}); fix: install "
            "the pinned versions (pip install -e .), or if the change is intended, copy the new "
            "manifest over the committed one and commit it"
        )
    return "verified"


def build_m21(out_dir: Path, params: CorpusParams, sources: Sequence[str] | None = None) -> Path:
    """Build the m21-keyboard corpus into `out_dir` and verify it against the committed manifest.

    Writes ``<corpus path, / -> __, score suffix dropped>.mid`` per piece and ``manifest.json``
    (file, source, notes, seconds, sha256 per piece, in build order). Stale .mid files in
    `out_dir` are removed first. Pieces are built in `params.num_workers` processes; results
    keep build order whatever the scheduling.

    Args:
        out_dir: the corpus folder (``raw_root/m21-keyboard``).
        params: the corpus section; `max_files` > 0 keeps the first N of `m21_sources()`.
        sources: build only these corpus paths (tests); each must be in `m21_sources()`.

    Returns:
        The path of the written manifest.json.

    Raises:
        CorpusError: wrong music21 version, an unknown source, or bytes that differ from the
            committed manifest.
    """
    import music21

    check_music21(music21.__version__)
    t0 = time.perf_counter()
    every = m21_sources()
    if sources is not None:
        unknown = [s for s in sources if s not in every]
        if unknown:
            raise CorpusError(
                f"{out_dir}: {unknown[0]!r} is not an m21-keyboard source (see m21_sources())"
            )
        todo = [s for s in every if s in set(sources)]
    else:
        todo = every[: params.max_files] if params.max_files > 0 else every

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.mid"):
        stale.unlink()
    jobs = [(s, str(out_dir)) for s in todo]
    workers = min(params.num_workers or os.cpu_count() or 1, len(jobs))
    bar = {"total": len(jobs), "desc": M21_CORPUS, "unit": "piece", "file": sys.stderr}
    if workers <= 1:
        rows = [_build_one(j) for j in tqdm(jobs, **bar)]
    else:
        # spawn: fresh interpreters, no state inherited from the caller; imap keeps input order
        with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=50) as pool:
            rows = list(tqdm(pool.imap(_build_one, jobs), **bar))

    import miditoolkit

    manifest = {
        "corpus": M21_CORPUS,
        "ticks_per_beat": TICKS_PER_BEAT,
        "versions": {"music21": music21.__version__, "miditoolkit": miditoolkit.__version__},
        "files": rows,
    }
    path = paths.corpus_manifest(out_dir)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    verified = _verify(rows, path, full=sources is None and params.max_files <= 0)
    built = CorpusResult.of(out_dir)
    print(f"{M21_CORPUS}: {built} -> {out_dir} ({time.perf_counter() - t0:.0f} s, {verified})")
    return path


# ---------------------------------------------------------------- Pop1K7


def parse_chord_marker(text: str) -> tuple[str, str, str] | None:
    """Parse a Pop1K7 chord marker (``midi_analyzed`` files; written by chorder).

    Args:
        text: marker text such as ``E_m7_B`` (root, quality, bass) or ``N_N_N`` (no chord).
            Qualities seen: M, m, o, +, 7, M7, m7, o7, /o7, sus2, sus4.

    Returns:
        (root, quality, bass), e.g. ("E", "m7", "B"); None for ``N_N_N``.

    Raises:
        ValueError: `text` is not a chord marker (e.g. ``global_bpm_120``).
    """
    if text == "N_N_N":
        return None
    match = _CHORD.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Pop1K7 chord marker (Root_Quality_Bass or N_N_N)")
    root, quality, bass = match.groups()
    return root, quality, bass


def parse_bpm_marker(text: str) -> int:
    """Parse a Pop1K7 ``global_bpm_<n>`` marker (the song's overall tempo) into n.

    Raises:
        ValueError: `text` is not a global_bpm marker.
    """
    match = _BPM.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Pop1K7 tempo marker (global_bpm_<n>)")
    return int(match.group(1))


def _get(url: str, what: str) -> Any:
    """Open `url` for reading, turning network errors into CorpusError."""
    try:
        return urllib.request.urlopen(url, timeout=60)
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSError
        raise CorpusError(
            f"{url}: cannot download {what} ({exc}); fix: check the network and "
            "corpus.zenodo_api, or download the archive yourself and pass --from PATH"
        ) from exc


def download_record(api: str, record: int, into: Path) -> list[Path]:
    """Download the archives of a Zenodo record into `into`, verifying size and md5.

    The records API (``GET <api>/<record>``) lists each file with ``key``, ``size``,
    ``checksum`` (``md5:<hex>``) and ``links`` (``content`` or ``self`` is the download).

    Returns:
        The downloaded archive paths (.zip, .tar.gz, .tgz, .tar), in the record's order.

    Raises:
        CorpusError: the API or a download fails, or a file's size or md5 differs.
    """
    url = f"{api.rstrip('/')}/{record}"
    with _get(url, "the record listing") as response:
        meta = json.load(response)
    entries = meta.get("files", [])
    entries = entries.get("entries", []) if isinstance(entries, dict) else entries
    archives = [
        e for e in entries if e["key"].lower().endswith((".zip", ".tar.gz", ".tgz", ".tar"))
    ]
    if not archives:
        keys = ", ".join(e["key"] for e in entries) or "none"
        raise CorpusError(f"{url}: no .zip/.tar.gz archive in the record (files: {keys})")
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for entry in archives:
        link = entry["links"].get("content") or entry["links"]["self"]
        path = into / Path(entry["key"]).name
        md5, size = hashlib.md5(), 0
        with _get(link, entry["key"]) as response, path.open("wb") as out:
            bar = tqdm(total=entry["size"], unit="B", unit_scale=True, desc=entry["key"])
            while chunk := response.read(1 << 20):
                out.write(chunk)
                md5.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
            bar.close()
        want_md5 = entry["checksum"].removeprefix("md5:")
        if size != entry["size"] or md5.hexdigest() != want_md5:
            raise CorpusError(
                f"{entry['key']} from {link}: expected {entry['size']} bytes with md5 {want_md5}, "
                f"got {size} bytes with md5 {md5.hexdigest()} (corrupt or truncated download); "
                "nothing was installed; fix: run the command again"
            )
        paths.append(path)
    return paths


class _Guard:
    """The one archive guard: every file taken from an archive or a folder goes through it.

    Only regular files with a MIDI name are written, streamed in 1 MiB chunks (never a whole
    entry in memory), counted as they are written (sizes in headers may lie), and refused past
    `max_entry_mb` each, `max_total_mb` together, or `max_ratio` times the archive's size; an
    archive with over `max_entries` members is refused. Links, devices, FIFOs and names that
    leave the folder (absolute, `..`) are refused. Each refusal is a CorpusError naming the
    archive, the entry and the limit.
    """

    def __init__(self, params: CorpusParams, source: Path) -> None:
        self.p, self.source = params, source
        self.entries = self.written = 0

    def refuse(self, name: str, why: str) -> CorpusError:
        if "corpus.max_" in why:
            why += " (raise it in params.yaml only for an archive you trust)"
        return CorpusError(
            f"{self.source}: refused entry {printable(name)!r}: {why}; nothing was installed"
        )

    def member(self, name: str, kind: str, size: int) -> bool:
        """Check one member before anything is read; True when it is a MIDI file to take.

        Args:
            name: its path in the archive.
            kind: "file", "dir", or what else it is ("symlink", "hard link", "device", ...).
            size: its declared size in bytes.
        """
        self.entries += 1
        if self.entries > self.p.max_entries:
            raise self.refuse(name, f"over corpus.max_entries={self.p.max_entries} members")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise self.refuse(name, "its path leaves the folder (absolute or '..')")
        if kind not in ("file", "dir"):
            raise self.refuse(name, f"a {kind}; only files and folders are taken")
        if size > self.p.max_entry_mb * 1e6:
            raise self.refuse(
                name, f"{size / 1e6:.1f} MB, over corpus.max_entry_mb={self.p.max_entry_mb:g}"
            )
        return kind == "file" and parts[-1].lower().endswith((".mid", ".midi"))

    def copy(
        self, name: str, src: BinaryIO, dest: Path, packed: Callable[[], int] | None = None
    ) -> None:
        """Stream `src` to `dest`, enforcing the size and ratio limits as bytes arrive.

        Args:
            packed: archive bytes consumed so far (ratio = bytes written / that); None for a
                folder. Checked past 1 MB written: a small file cannot be a bomb.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        size, max_entry = 0, self.p.max_entry_mb * 1e6
        with dest.open("xb") as out:  # "x": two members with one name are not merged silently
            while chunk := src.read(1 << 20):
                size += len(chunk)
                self.written += len(chunk)
                if size > max_entry:
                    raise self.refuse(name, f"over corpus.max_entry_mb={self.p.max_entry_mb:g}")
                if self.written > self.p.max_total_mb * 1e6:
                    raise self.refuse(
                        name, f"files total over corpus.max_total_mb={self.p.max_total_mb:g}"
                    )
                ratio_cap = self.p.max_ratio * packed() if packed else None
                if ratio_cap is not None and self.written > max(ratio_cap, 1e6):
                    raise self.refuse(
                        name,
                        f"expands over corpus.max_ratio={self.p.max_ratio:g} times the "
                        "archive's size (a decompression bomb?)",
                    )
                out.write(chunk)


_TAR_KINDS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


def _unpack(archive: Path, into: Path, params: CorpusParams) -> None:
    """Extract the MIDI files of a .zip, .tar.gz/.tgz or .tar into `into` through `_Guard`."""
    name = archive.name.lower()
    try:
        with files.open_regular(archive) as (fh, _):
            guard = _Guard(params, archive)
            if name.endswith(".zip"):
                with zipfile.ZipFile(fh) as zf:
                    packed = 0  # compressed bytes of the members so far, this one included
                    for info in zf.infolist():
                        packed += info.compress_size
                        mode = info.external_attr >> 16
                        kind = "dir" if info.is_dir() else "file"
                        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                            kind = "symlink" if stat.S_ISLNK(mode) else "special file"
                        if guard.member(info.filename, kind, info.file_size):
                            with zf.open(info) as src:
                                guard.copy(
                                    info.filename, src, into / info.filename, lambda n=packed: n
                                )
            elif name.endswith((".tar.gz", ".tgz", ".tar")):
                # stream mode ("r|*"): members in order, nothing seeks or reads ahead
                with tarfile.open(fileobj=fh, mode="r|*") as tf:
                    for member in tf:
                        kind = "file" if member.isreg() else "dir" if member.isdir() else None
                        kind = kind or _TAR_KINDS.get(member.type, "special file")
                        if guard.member(member.name, kind, member.size):
                            src = tf.extractfile(member)
                            assert src is not None  # a regular member
                            guard.copy(member.name, src, into / member.name, fh.tell)
            else:
                raise CorpusError(
                    f"{archive}: expected a .zip, .tar.gz, .tgz or .tar archive, or a folder"
                )
    except files.FileRefusedError as exc:
        raise CorpusError(f"{exc}; fix: pass an archive file or a folder to --from") from exc
    except FileExistsError as exc:
        raise CorpusError(f"{archive}: two members named {exc.filename!r}") from exc
    except CorpusError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CorpusError(
            f"{archive}: cannot extract ({type(exc).__name__}: {exc}); fix: download it again"
        ) from exc
    except (RuntimeError, NotImplementedError) as exc:  # zipfile: encrypted, unknown method
        raise CorpusError(f"{archive}: cannot extract ({exc})") from exc


def _is_midi(path: Path) -> bool:
    """A MIDI file by name, skipping macOS resource forks (``._x.mid``, ``__MACOSX/``).

    Not a folder; anything else by that name (a FIFO, a link to a device) is refused when it
    is copied, never skipped silently.
    """
    return (
        path.suffix.lower() in (".mid", ".midi")
        and not path.name.startswith("._")
        and "__MACOSX" not in path.parts
        and not path.is_dir()
    )


def _select_midi(root: Path) -> tuple[Path, list[Path]]:
    """Find the files to install: midi_analyzed/ of the official layout, else every MIDI file.

    Returns:
        (base folder, MIDI paths relative to it, sorted).
    """
    dirs = sorted(
        (d for d in root.rglob("midi_*") if d.is_dir() and "__MACOSX" not in d.parts),
        key=lambda d: (len(d.parts), str(d)),
    )
    analyzed = [d for d in dirs if d.name == "midi_analyzed"]
    if analyzed:
        base = analyzed[0]
    elif any(d.name in POP1K7_LAYOUT for d in dirs):
        found = ", ".join(sorted({d.name for d in dirs if d.name in POP1K7_LAYOUT}))
        raise CorpusError(
            f"{root}: Pop1K7 layout ({found}) without midi_analyzed/, whose files carry the chord "
            "and tempo markers; fix: use the full archive, or pass a folder of the files you want"
        )
    else:
        base = root
        print(
            f"pop1k7: {root}: no midi_analyzed/ folder (official layout); "
            "taking every MIDI file under it, relative paths kept"
        )
    files = sorted(p.relative_to(base) for p in base.rglob("*") if _is_midi(p))
    if not files:
        raise CorpusError(
            f"{base}: no .mid/.midi files found; fix: point --from at the Pop1K7 archive or folder"
        )
    return base, files


def check_pop1k7_format(path: Path) -> list[str]:
    """List how one file deviates from Pop1K7's midi_analyzed format (empty when it conforms).

    Expected: 480 ticks per beat, a track named ``piano``, chord markers (``Root_Quality_Bass``
    or ``N_N_N``) and a ``global_bpm_<n>`` marker.
    """
    try:
        midi = load_midi(path)
    except MidiError as exc:
        return [f"{exc.reason}: {exc.detail}"]
    problems = []
    if midi.ticks_per_beat != TICKS_PER_BEAT:
        problems.append(f"{midi.ticks_per_beat} ticks per beat (expected {TICKS_PER_BEAT})")
    if not any(inst.name.strip().lower() == "piano" for inst in midi.instruments):
        names = ", ".join(repr(i.name) for i in midi.instruments) or "none"
        problems.append(f"no 'piano' track (tracks: {names})")
    texts = [m.text for m in midi.markers]
    if not any(t == "N_N_N" or _CHORD.match(t) for t in texts):
        problems.append("no chord markers (Root_Quality_Bass or N_N_N)")
    if not any(_BPM.match(t) for t in texts):
        problems.append("no global_bpm_<n> marker")
    return problems


def fetch_pop1k7(dest: Path, params: CorpusParams, source: Path | None = None) -> Path:
    """Install Pop1K7's midi_analyzed MIDI files into `dest`, atomically.

    With `source` None, downloads the archives of Zenodo record `params.pop1k7_record` from
    `params.zenodo_api`, verifying each file's size and md5. Otherwise `source` is an archive
    (.zip, .tar.gz, .tgz, .tar) or a folder. From the official layout (midi_transcribed/,
    midi_synchronized/, midi_analyzed/) only midi_analyzed/ is taken, keeping its
    ``<channel>/<title>.mid`` paths; a folder without it contributes every MIDI file. A sample
    is checked against the Pop1K7 format and deviations are warned about (prepare validates
    every file later). Nothing in `dest` changes until everything has succeeded.

    Args:
        dest: the corpus folder (``raw_root/pop1k7``); replaced as a whole.
        params: the corpus section (zenodo_api, pop1k7_record).
        source: an archive or folder on disk, or None to download.

    Returns:
        `dest`.

    Raises:
        CorpusError: download, checksum or extraction failure, or no MIDI files found.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest)
    # work beside dest: the final rename stays on one filesystem; removed even on error, Ctrl-C
    # or SIGTERM (_signals_exit); a SIGKILL leaves it for the next run's _remove_stale
    prefix = f".{dest.name}-{os.getpid()}-"
    with (
        _signals_exit(),
        tempfile.TemporaryDirectory(prefix=prefix, dir=dest.parent) as tmp_name,
    ):
        tmp = Path(tmp_name)
        if source is not None and Path(source).is_dir():
            root = Path(source)
        else:
            if source is None:
                archives = download_record(
                    params.zenodo_api, params.pop1k7_record, tmp / "download"
                )
            elif Path(source).is_file():
                archives = [Path(source)]
            else:
                raise CorpusError(
                    f"{source}: no such archive or folder; fix: check the --from path"
                )
            root = tmp / "unpacked"
            for archive in archives:
                _unpack(archive, root, params)
        base, midis = _select_midi(root)
        stage = tmp / "stage"
        guard = _Guard(params, Path(source or "Zenodo"))
        for rel in tqdm(midis, desc="pop1k7 copy", unit="file"):
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            if root.is_relative_to(tmp):  # extracted by _unpack's guard: move, don't copy
                (base / rel).rename(stage / rel)
                continue
            try:  # a folder: the same safe read and limits as an archive's members
                with files.open_regular(base / rel) as (src, _):
                    guard.copy(str(rel), src, stage / rel)
            except files.FileRefusedError as exc:
                raise CorpusError(f"{exc}; fix: remove it from {source} or replace it") from exc
        for rel in midis[:_SAMPLE]:
            if problems := check_pop1k7_format(stage / rel):
                warnings.warn(
                    f"{base / rel}: not in Pop1K7 format: {'; '.join(problems)} "
                    "(kept; prepare validates every file)",
                    CorpusWarning,
                    stacklevel=2,
                )
        old = tmp / "old"
        if dest.exists():
            dest.rename(old)  # the previous install, removed with tmp
        try:
            stage.rename(dest)
        except OSError:
            if old.exists():
                old.rename(dest)  # put the previous install back
            raise
    print(f"pop1k7: {len(midis)} MIDI files from {source or 'Zenodo'} -> {dest}")
    return dest


def _remove_stale(dest: Path) -> None:
    """Remove temp folders of earlier installs into `dest` whose process is gone (SIGKILL)."""
    for tmp in dest.parent.glob(f".{dest.name}-*"):
        pid = tmp.name.removeprefix(f".{dest.name}-").split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)  # still running: another install, leave it alone
            except ProcessLookupError:
                shutil.rmtree(tmp, ignore_errors=True)
            except PermissionError:  # alive, another user's
                pass


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit inside the block, so `finally` clean-up runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    saved = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
