"""The evaluate stage on folders of MIDI written with miditoolkit, bad files included."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import miditoolkit
import numpy as np
import pytest
from miditoolkit.midi.utils import example_midi_file

from musegen.config import ParamsError, load_section
from musegen.core import metrics
from musegen.core.midi import Score, load_midi, to_score
from musegen.stages.evaluate import EvaluateParams, evaluate, proxy_score
from tests import badmidi
from tests.test_metrics import loop_piece, score, varied_piece

ROOT = Path(__file__).resolve().parents[1]
PARAMS = EvaluateParams(
    max_files=0,
    seed=0,
    crop_bars=32,
    loop_percentile=95,
    loop_margin=0.1,
    num_samples=4,
    out_dir="reports/evaluate",
)
BAR = 1920


def write(score_: Score, path: Path) -> Path:
    """Write a Score as a one-track piano MIDI file at 480 ticks per beat."""
    midi = miditoolkit.MidiFile(ticks_per_beat=480)
    piano = miditoolkit.Instrument(program=0, name="piano")
    piano.notes = [miditoolkit.Note(int(v), int(p), int(s), int(e)) for s, e, p, v in score_.notes]
    midi.instruments.append(piano)
    path.parent.mkdir(parents=True, exist_ok=True)
    midi.dump(str(path))
    return path


def segments(notes: np.ndarray, n_bars: int = 2) -> list[Score]:
    """A 36-bar note table cut into pieces of n_bars, each shifted to start at 0."""
    out = []
    for first in range(0, 36 - n_bars + 1, n_bars):
        lo, hi = first * BAR, (first + n_bars) * BAR
        seg = notes[(notes[:, 0] >= lo) & (notes[:, 0] < hi)].copy()
        seg[:, 1] = np.minimum(seg[:, 1], hi)  # pedal-held notes end at the cut
        seg[:, :2] -= lo
        out.append(score(seg.tolist()))
    return out


def shuffled(notes: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same notes with pitches permuted over the piece and onsets moved to random 16ths
    of their own bar (lengths kept): the statistics of the notes, not their order."""
    rng = np.random.default_rng(seed)
    notes = notes.copy()
    length = notes[:, 1] - notes[:, 0]
    notes[:, 0] = notes[:, 0] // BAR * BAR + rng.integers(0, 16, len(notes)) * 120
    notes[:, 1] = notes[:, 0] + length
    notes[:, 2] = rng.permutation(notes[:, 2])
    return notes


@pytest.fixture(scope="module")
def pop_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """miditoolkit's Pop1K7 example (36 bars) in 2-bar pieces: the even ones are the
    reference, the odd ones the real samples, the odd ones of a shuffled copy the shuffled."""
    root = tmp_path_factory.mktemp("pop")
    notes = to_score(load_midi(example_midi_file())).notes
    for i, (seg, shuf) in enumerate(zip(segments(notes), segments(shuffled(notes)), strict=True)):
        if i % 2 == 0:
            write(seg, root / "reference" / f"seg{i:02d}.mid")
        else:
            write(seg, root / "real" / f"seg{i:02d}.mid")
            write(shuf, root / "shuffled" / f"seg{i:02d}.mid")
    return {name: root / name for name in ("reference", "real", "shuffled")}


def test_bad_files_are_rejected_with_reasons(tmp_path: Path):
    ref, smp = tmp_path / "ref", tmp_path / "samples"
    for seed in range(12):
        write(varied_piece(seed), ref / f"v{seed}.mid")
        write(varied_piece(seed + 100), smp / "deep" / f"s{seed:02d}.mid")  # read recursively
    badmidi.empty(smp)
    badmidi.corrupt_track(smp)
    badmidi.text_file(smp)
    badmidi.drums_only(smp)
    out = tmp_path / "reports" / "evaluate.json"

    result = evaluate(smp, ref, out, PARAMS)

    reasons = {r["path"]: r["reason"] for r in result["rejected"]}
    assert reasons == {
        "empty.mid": "empty_file",
        "corrupt_status.mid": "corrupt",
        "readme.txt": "not_midi",
        "drums_only.mid": "drums_only",
    }
    assert all(r["set"] == "samples" and r["detail"] for r in result["rejected"])
    assert result["samples"]["n_ok"] == 12 and result["reference"]["n_ok"] == 12
    assert sorted(result["samples"]["pieces"]) == [f"deep/s{i:02d}.mid" for i in range(12)]
    assert json.loads(out.read_text()) == result  # the file is the returned dict, NaN-free
    assert set(result["mgeval"]) == {
        *metrics.mgeval_features(varied_piece()),
        *(f"m_{k}" for k in metrics.OBJECTIVE_METRICS),
        "onset_profile",
    }
    # Same generator on both sides: the statistics overlap and nothing loops.
    assert result["mean_oa"] > 0.8
    assert all(v["penalty"] == 0 for v in result["loops"].values())
    assert result["proxy_score"] == (result["mean_oa"] + result["order_score"]) / 2
    assert list(result["ladder"]) == ["real", "bars_shuffled", "pitches_shuffled", "random"]
    # Without the margin, samples a few zlib bytes below the reference's p5 count as loops.
    strict = evaluate(smp, ref, out, dataclasses.replace(PARAMS, loop_margin=0))
    assert strict["loops"]["zlib_ratio"]["penalty"] > 0
    mean = result["samples"]["mean"]
    assert mean["notes_per_bar"] == 8 and result["samples"]["std"]["notes_per_bar"] == 0


def test_real_beats_shuffled_notes(pop_dirs: dict[str, Path], tmp_path: Path):
    real = evaluate(pop_dirs["real"], pop_dirs["reference"], tmp_path / "real.json", PARAMS)
    shuf = evaluate(pop_dirs["shuffled"], pop_dirs["reference"], tmp_path / "shuf.json", PARAMS)
    assert real["rejected"] == [] and shuf["samples"]["n_ok"] == 9
    for k in real["mgeval"]:
        print(k, round(real["mgeval"][k]["oa"], 3), round(shuf["mgeval"][k]["oa"], 3))
    assert shuf["mean_oa"] < real["mean_oa"] - 0.1  # measured 0.84 -> 0.69
    # Rhythm (onsets moved) and key (pitches from elsewhere in the piece) give it away.
    for name in ("avg_ioi", "m_gs", "total_pitch_class_histogram", "m_scale_consistency"):
        assert shuf["mgeval"][name]["oa"] < real["mgeval"][name]["oa"] - 0.2, name
    assert proxy_score(shuf) < proxy_score(real)
    assert all(math.isfinite(v["kl"]) for r in (real, shuf) for v in r["mgeval"].values())


# ---- the proxy hears order: real pieces against perturbations this test makes itself ----


def bars_of(notes: np.ndarray) -> np.ndarray:
    return (notes[:, 0] + 60) // BAR  # the bar of each onset rounded to the 16th grid


def bars_shuffled(notes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bar = bars_of(notes)
    out = notes.copy()
    out[:, :2] += ((rng.permutation(bar.max() + 1)[bar] - bar) * BAR)[:, None]
    return out


def bars_reversed(notes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bar = bars_of(notes)
    out = notes.copy()
    out[:, :2] += ((bar.max() - 2 * bar) * BAR)[:, None]
    return out


def beat_shifted(notes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every note one 8th or one beat later: the bar lines fall elsewhere in the music."""
    out = notes.copy()
    out[:, :2] += int(rng.choice([240, 480]))
    return out


def pitches_shuffled(notes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = notes.copy()
    out[:, 2] = rng.permutation(out[:, 2])
    return out


def random_notes(notes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, cells = len(notes), (bars_of(notes).max() + 1) * 16
    start = rng.integers(0, cells, n) * 120
    return np.stack([start, start + 120 * rng.integers(1, 9, n), rng.integers(21, 109, n),
                     notes[:, 3]], 1)  # fmt: skip


@pytest.fixture(scope="module")
def real_segments(real_midi_files: list[Path]) -> dict[str, list[Score]]:
    """4-bar segments of real pieces (rag, sonata, mazurka, lead sheet, song, chorales ...):
    alternate ones are the reference and the real set."""
    segs = []
    for path in real_midi_files:
        notes = to_score(load_midi(path)).notes
        for first in range(0, int(bars_of(notes).max()) - 3, 4):
            keep = (bars_of(notes) >= first) & (bars_of(notes) < first + 4)
            seg = notes[keep].copy()
            seg[:, :2] -= first * BAR
            seg[:, 1] = np.minimum(seg[:, 1], 4 * BAR)
            if len(seg) >= 8:
                segs.append(score(seg.tolist()))
    return {"reference": segs[0::2], "real": segs[1::2]}


def test_the_proxy_orders_the_ladder_on_real_pieces(real_segments: dict[str, list[Score]]):
    from musegen.stages.evaluate import score_set

    ref = real_segments["reference"]
    ref_metrics = [metrics.piece_metrics(s) for s in ref]
    ref_features = metrics.set_features(ref, ref_metrics)
    params = dataclasses.replace(PARAMS, crop_bars=4)

    def proxy(change) -> float:
        rng = np.random.default_rng(7)
        # cropped to the 4 bars, as evaluate crops: a shift must not add a bar
        changed = [
            metrics.crop(score(change(s.notes, rng).tolist()), 4) for s in real_segments["real"]
        ]
        return score_set(changed, ref_features, ref_metrics, params)["proxy_score"]

    real = proxy(lambda notes, rng: notes)
    ladder = [real, proxy(bars_shuffled), proxy(pitches_shuffled), proxy(random_notes)]
    print(len(ref), "reference,", len(real_segments["real"]), "real; ladder", ladder)
    assert ladder == sorted(ladder, reverse=True) and ladder[0] > ladder[1] + 0.02, ladder
    for other in (bars_reversed, beat_shifted):
        assert proxy(other) < real - 0.02, other.__name__


def test_loops_are_penalised(tmp_path: Path):
    ref, smp = tmp_path / "ref", tmp_path / "loops"
    for seed in range(8):
        write(varied_piece(seed, n_bars=32), ref / f"v{seed}.mid")
    for t in range(6):  # the 2-bar loop, transposed so the samples differ
        write(score((loop_piece().notes + np.array([0, 0, t, 0])).tolist()), smp / f"loop{t}.mid")
    result = evaluate(smp, ref, tmp_path / "out.json", PARAMS)
    loops = result["loops"]
    assert loops["dup_bar_rate"]["threshold"] == 0 and loops["dup_bar_rate"]["share_beyond"] == 1
    ref4 = [m["distinct_4gram_ratio"] for m in result["reference"]["pieces"].values()]
    expected = np.percentile(ref4, 5) - 0.1 * np.median(ref4)  # p5 less margin x median
    assert loops["distinct_4gram_ratio"]["threshold"] == pytest.approx(expected)
    assert all(v["penalty"] == pytest.approx(0.95) for v in loops.values())
    half = (result["mean_oa"] + result["order_score"]) / 2
    assert result["proxy_score"] == pytest.approx(half - 0.95)


def test_max_files_and_crop(tmp_path: Path):
    for seed in range(5):
        write(varied_piece(seed, n_bars=20), tmp_path / "ref" / f"v{seed}.mid")
    params = dataclasses.replace(PARAMS, max_files=3, crop_bars=8)
    result = evaluate(tmp_path / "ref", tmp_path / "ref", tmp_path / "out.json", params)
    assert result["samples"]["n_ok"] == result["reference"]["n_ok"] == 3
    assert result["samples"]["pieces"] == result["reference"]["pieces"]  # same seeded pick
    assert all(m["n_bars"] == 8 for m in result["samples"]["pieces"].values())


def test_params_section_and_errors(tmp_path: Path):
    assert load_section(EvaluateParams, "evaluate", ROOT / "params.yaml").loop_percentile == 95
    with pytest.raises(ParamsError, match=r"evaluate\.loop_percentile"):
        dataclasses.replace(PARAMS, loop_percentile=100)
    with pytest.raises(FileNotFoundError, match="samples folder not found"):
        evaluate(tmp_path / "missing", tmp_path, tmp_path / "out.json", PARAMS)
    empty = tmp_path / "nothing"
    empty.mkdir()
    result = evaluate(empty, empty, tmp_path / "out.json", PARAMS)  # no pieces: values, no crash
    assert result["mean_oa"] == 0 and all(v["note"] == "too_few" for v in result["mgeval"].values())
