"""Tests for musegen.stages.corpus: the m21-keyboard build and the Pop1K7 fetch (offline)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import miditoolkit
import music21
import pytest
import yaml
from miditoolkit.midi.utils import example_midi_file

from musegen.core.midi import TICKS_PER_BEAT, load_midi, to_score
from musegen.stages import corpus
from musegen.stages.corpus import CorpusError, CorpusParams, CorpusWarning

ROOT = Path(__file__).resolve().parents[1]

# varied and quick: repeat fallback (3/4), lead sheet, voice+piano, atonal piano, two chorales
# (bwv277 names both a .krn and a .mxl: the .mxl must win), given out of build order.
SUBSET = [
    "bach/bwv277",
    "schoenberg/opus19/movement2.mxl",
    "chopin/mazurka06-2.krn",
    "leadSheet/fosterBrownHair.mxl",
    "schubert/Lindenbaum.xml",
    "bach/bwv269",
]
EXPECTED = {r["file"]: r for r in json.loads(corpus.EXPECTED_MANIFEST.read_text())["files"]}


def params(**kw: object) -> CorpusParams:
    """params.yaml's corpus section, offline, with test overrides."""
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["corpus"]
    base = section | {"num_workers": 1, "zenodo_api": "http://127.0.0.1:9", "pop1k7_record": 7}
    return CorpusParams(**{**base, **kw})  # type: ignore[arg-type]


# ---------------------------------------------------------------- m21-keyboard


def test_params_match_params_yaml() -> None:
    from musegen.config import load_section

    p = load_section(CorpusParams, "corpus", "params.yaml")
    assert p.zenodo_api == "https://zenodo.org/api/records" and p.pop1k7_record == 13167761


def test_version_guard_refuses_other_music21(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(music21, "__version__", "9.1.0")
    with pytest.raises(CorpusError, match=r"needs music21==10\.5\.1, found 9\.1\.0"):
        corpus.build_m21(tmp_path / "out", params())
    assert not (tmp_path / "out").exists()


def test_sources_order_and_names() -> None:
    sources = corpus.m21_sources()
    riemenschneider = music21.corpus.chorales.Iterator(
        numberingSystem="riemenschneider", returnType="filename"
    )
    chorales = list(dict.fromkeys(riemenschneider))
    assert sources == [*corpus.M21_PIECES, *chorales]
    assert len(corpus.M21_PIECES) == 19 and len(chorales) == 350
    assert len(set(sources)) == len(sources) == len(EXPECTED)
    assert [r["source"] for r in EXPECTED.values()] == sources  # committed in build order
    assert corpus.midi_name("joplin/maple_leaf_rag.mxl") == "joplin__maple_leaf_rag.mid"
    assert corpus.midi_name("bach/bwv245.3") == "bach__bwv245.3.mid"  # the dot is not a suffix
    assert corpus._resolve("bach/bwv277").name == "bwv277.mxl"
    assert corpus._resolve("bach/bwv244.3").name == "bwv244.3.mxl"  # not the prefix match .32


def test_unknown_source_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"'bach/bwv9999' is not an m21-keyboard source"):
        corpus.build_m21(tmp_path, params(), ["bach/bwv9999"])


def test_max_files_takes_the_first_pieces(tmp_path: Path) -> None:
    manifest = corpus.build_m21(tmp_path, params(max_files=2))
    rows = json.loads(manifest.read_text())["files"]
    assert [r["source"] for r in rows] == list(corpus.M21_PIECES[:2])
    assert sorted(p.name for p in tmp_path.glob("*.mid")) == sorted(r["file"] for r in rows)


def test_subset_build_is_verified_and_byte_identical(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    (first / "stale.mid").write_bytes(b"old build")
    corpus.build_m21(first, params(num_workers=2), SUBSET)  # process pool
    corpus.build_m21(second, params(num_workers=1), SUBSET)  # in process
    assert not (first / "stale.mid").exists()
    rows = json.loads((first / "manifest.json").read_text())["files"]
    # build order, not the order asked for
    assert [r["source"] for r in rows] == [s for s in corpus.m21_sources() if s in SUBSET]
    for row in rows:
        data = (first / row["file"]).read_bytes()
        assert data == (second / row["file"]).read_bytes(), row["file"]
        assert hashlib.sha256(data).hexdigest() == row["sha256"] == EXPECTED[row["file"]]["sha256"]
        midi = load_midi(first / row["file"])
        assert midi.ticks_per_beat == TICKS_PER_BEAT
        assert [(i.name, i.program, i.is_drum) for i in midi.instruments] == [("piano", 0, False)]
        assert midi.tempo_changes[0].time == 0 and midi.time_signature_changes
        score = to_score(midi)
        assert len(score.notes) == row["notes"] == EXPECTED[row["file"]]["notes"] > 50
        assert score.seconds() == pytest.approx(row["seconds"], abs=1e-3)


def test_mismatch_against_committed_manifest_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = json.loads(corpus.EXPECTED_MANIFEST.read_text())
    for row in expected["files"]:
        if row["file"] == "bach__bwv269.mid":
            row["sha256"] = "0" * 64
    fake = tmp_path / "expected.json"
    fake.write_text(json.dumps(expected))
    monkeypatch.setattr(corpus, "EXPECTED_MANIFEST", fake)
    with pytest.raises(
        CorpusError, match=r"1 file\(s\) differ(.|\n)*bach__bwv269\.mid: expected 000000"
    ):
        corpus.build_m21(tmp_path / "out", params(), ["bach/bwv269"])
    assert (tmp_path / "out" / "manifest.json").is_file()  # kept for diffing


def _two_part_midi(division: int, parts: list[list[tuple[int, int, int, int]]]) -> bytes:
    """A MIDI file with one track per part; notes are (velocity, pitch, start, end)."""
    midi = miditoolkit.MidiFile(ticks_per_beat=division)
    midi.instruments = [
        miditoolkit.Instrument(program=52, name=f"voice{i}") for i in range(len(parts))
    ]
    for inst, notes in zip(midi.instruments, parts, strict=True):
        inst.notes = [miditoolkit.Note(*n) for n in notes]
    midi.tempo_changes = [miditoolkit.TempoChange(90.0, 0)]
    midi.time_signature_changes = [miditoolkit.TimeSignature(3, 4, 0)]
    buf = io.BytesIO()
    midi.dump(file=buf)
    return buf.getvalue()


def test_merge_to_piano_rescales_and_makes_each_pitch_monophonic() -> None:
    d = 10080  # music21's resolution: 21 x 480
    data = _two_part_midi(
        d,
        [
            [(90, 60, 0, d), (80, 64, 0, 2 * d)],  # C4 quarter; E4 half (re-struck below)
            [(100, 60, 0, d // 2), (70, 64, d, 2 * d), (60, 67, d // 7, 2 * d // 7)],
        ],
    )
    midi = miditoolkit.MidiFile(file=io.BytesIO(corpus.merge_to_piano(data)))
    assert midi.ticks_per_beat == 480 and [i.name for i in midi.instruments] == ["piano"]
    got = sorted((n.start, n.end, n.pitch, n.velocity) for n in midi.instruments[0].notes)
    assert got == [
        (0, 480, 60, 100),  # unison struck together: one note, longest end, loudest velocity
        (0, 480, 64, 80),  # cut where E4 is struck again
        (69, 137, 67, 60),  # 7-tuplet: 480/7 = 68.57 -> 69, 960/7 = 137.14 -> 137
        (480, 960, 64, 70),
    ]
    assert [t.time for t in midi.tempo_changes] == [0]
    assert midi.tempo_changes[0].tempo == pytest.approx(90.0, abs=1e-3)  # stored as µs per beat
    assert [(t.time, t.numerator, t.denominator) for t in midi.time_signature_changes] == [
        (0, 3, 4)
    ]


# ---------------------------------------------------------------- Pop1K7 markers and format


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("E_m7_B", ("E", "m7", "B")), ("F#_/o7_A", ("F#", "/o7", "A")), ("N_N_N", None)],
)
def test_parse_chord_marker(text: str, parsed: tuple[str, str, str] | None) -> None:
    assert corpus.parse_chord_marker(text) == parsed


def test_marker_parsers_reject_the_other_kind() -> None:
    assert corpus.parse_bpm_marker("global_bpm_120") == 120
    with pytest.raises(ValueError, match="'global_bpm_120' is not a Pop1K7 chord marker"):
        corpus.parse_chord_marker("global_bpm_120")
    with pytest.raises(ValueError, match="'E_m_E' is not a Pop1K7 tempo marker"):
        corpus.parse_bpm_marker("E_m_E")


def test_every_marker_of_the_fixture_parses() -> None:
    markers = [m.text for m in miditoolkit.MidiFile(example_midi_file()).markers]
    chords = [corpus.parse_chord_marker(t) for t in markers if not t.startswith("global_bpm")]
    assert len(chords) == len(markers) - 1 and ("E", "m", "E") in chords


def test_check_pop1k7_format(tmp_path: Path) -> None:
    assert corpus.check_pop1k7_format(Path(example_midi_file())) == []
    other = tmp_path / "other.mid"
    midi = miditoolkit.MidiFile(ticks_per_beat=960)
    midi.instruments = [miditoolkit.Instrument(0, name="Acoustic")]
    midi.instruments[0].notes = [miditoolkit.Note(80, 60, 0, 960)]
    midi.dump(other)
    assert corpus.check_pop1k7_format(other) == [
        "960 ticks per beat (expected 480)",
        "no 'piano' track (tracks: 'Acoustic')",
        "no chord markers (Root_Quality_Bass or N_N_N)",
        "no global_bpm_<n> marker",
    ]


# ---------------------------------------------------------------- Pop1K7 fetch

SONGS = ["ChannelA/Song One.mid", "ChannelA/second.mid", "Channel B/third.mid"]
BAD = "Channel B/broken.mid"


@pytest.fixture
def official(tmp_path: Path) -> Path:
    """A Pop1K7-layout folder: three copies of 1390.mid, one truncated file, and junk."""
    root = tmp_path / "src" / "Pop1K7"
    fixture = Path(example_midi_file()).read_bytes()
    for song in SONGS:
        for stage in corpus.POP1K7_LAYOUT:
            (root / stage / song).parent.mkdir(parents=True, exist_ok=True)
            (root / stage / song).write_bytes(fixture)
    (root / "midi_analyzed" / BAD).write_bytes(fixture[:100])
    (root / "midi_analyzed" / "ChannelA" / "._second.mid").write_bytes(b"\0\5\26\7")
    (root / "midi_analyzed" / "notes.txt").write_text("not MIDI")
    return root


def _installed(dest: Path) -> list[str]:
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def _archive(folder: Path, path: Path) -> Path:
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zf:
            for p in sorted(folder.rglob("*")):
                zf.write(p, p.relative_to(folder.parent))
    else:
        with tarfile.open(path, "w:gz") as tf:
            tf.add(folder, arcname=folder.name)
    return path


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "folder"])
def test_fetch_from_disk(official: Path, tmp_path: Path, kind: str) -> None:
    source = official if kind == "folder" else _archive(official, tmp_path / f"Pop1K7.{kind}")
    dest = tmp_path / "raw" / "pop1k7"
    with pytest.warns(CorpusWarning, match=r"broken\.mid: not in Pop1K7 format: truncated"):
        assert corpus.fetch_pop1k7(dest, params(), source) == dest
    assert _installed(dest) == sorted([*SONGS, BAD])
    assert (dest / SONGS[0]).read_bytes() == Path(example_midi_file()).read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["pop1k7"]  # no temp folders left


def test_fetch_plain_folder_and_missing_analyzed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plain = tmp_path / "mine" / "wrapped"
    (plain / "sub").mkdir(parents=True)
    shutil.copyfile(example_midi_file(), plain / "sub" / "a.MID")
    corpus.fetch_pop1k7(tmp_path / "dest", params(), tmp_path / "mine")
    assert _installed(tmp_path / "dest") == ["wrapped/sub/a.MID"]  # relative paths kept
    assert "no midi_analyzed/ folder" in capsys.readouterr().out

    (plain / "midi_synchronized").mkdir()
    with pytest.raises(CorpusError, match=r"layout \(midi_synchronized\) without midi_analyzed/"):
        corpus.fetch_pop1k7(tmp_path / "dest2", params(), tmp_path / "mine")
    with pytest.raises(CorpusError, match=r"nope\.rar: expected a \.zip, \.tar\.gz"):
        (tmp_path / "nope.rar").write_bytes(b"x")
        corpus.fetch_pop1k7(tmp_path / "dest2", params(), tmp_path / "nope.rar")
    assert not (tmp_path / "dest2").exists()


@pytest.fixture
def zenodo(official: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A real HTTP server on 127.0.0.1 serving a records API listing and one archive."""
    archive = _archive(official, tmp_path / "Pop1K7.zip").read_bytes()
    routes: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = routes.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    content = f"{base}/api/records/7/files/Pop1K7.zip/content"
    listing = {
        "id": 7,
        "files": [
            {"key": "README.md", "size": 2, "checksum": "md5:00", "links": {"self": f"{base}/x"}},
            {
                "key": "Pop1K7.zip",
                "size": len(archive),
                "checksum": "md5:" + hashlib.md5(archive).hexdigest(),
                "links": {"self": content},
            },
        ],
    }
    routes["/api/records/7"] = json.dumps(listing).encode()
    routes[content.removeprefix(base)] = archive
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base, routes
    server.shutdown()
    server.server_close()


def test_fetch_downloads_and_verifies(zenodo: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    base, _ = zenodo
    dest = tmp_path / "raw" / "pop1k7"
    dest.mkdir(parents=True)
    (dest / "old.mid").write_bytes(b"previous install")
    with pytest.warns(CorpusWarning, match="broken.mid"):
        corpus.fetch_pop1k7(dest, params(zenodo_api=f"{base}/api/records"), None)
    assert _installed(dest) == sorted([*SONGS, BAD])  # replaced as a whole
    assert [p.name for p in dest.parent.iterdir()] == ["pop1k7"]


def test_corrupt_download_leaves_dest_untouched(
    zenodo: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    base, routes = zenodo
    path = "/api/records/7/files/Pop1K7.zip/content"
    data = bytearray(routes[path])
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    routes[path] = bytes(data)
    dest = tmp_path / "raw" / "pop1k7"
    dest.mkdir(parents=True)
    (dest / "old.mid").write_bytes(b"previous install")
    with pytest.raises(
        CorpusError, match=r"Pop1K7\.zip from http://127\.0\.0\.1:\d+/.*expected \d+ bytes with md5"
    ):
        corpus.fetch_pop1k7(dest, params(zenodo_api=f"{base}/api/records"), None)
    assert _installed(dest) == ["old.mid"]
    assert [p.name for p in dest.parent.iterdir()] == ["pop1k7"]


def test_unreachable_api_names_the_url_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        CorpusError, match=r"http://127\.0\.0\.1:9/7: cannot download(.|\n)*--from PATH"
    ):
        corpus.fetch_pop1k7(tmp_path / "pop1k7", params(), None)
    assert list(tmp_path.iterdir()) == []
