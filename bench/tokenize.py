"""Tokenizer benchmark: musegen vs MidiTok 3.1 (REMI and CPWord) on the same files, one run.

End to end per file: parse the MIDI file and tokenize it. MidiTok parses with symusic; musegen
with musegen.core.midi.read_score (symusic too) by default, and also through miditoolkit (the
`load_midi` + `to_score` path) to show what the parser costs. MidiTok is configured as close to
musegen as it allows: pitches 21-108, 8 positions per beat, durations up to 8 beats, 64
velocities, 32 log-spaced tempos 30-240 BPM, chords, rests.

    .venv/bin/python bench/tokenize.py                      # data/raw/m21-keyboard
    .venv/bin/python bench/tokenize.py --midi-dir some/folder --repeat 5

Prints files/s for each and musegen's speed-up over MidiTok (goal: >= 2x).
"""

from __future__ import annotations

import sys

# This file is named like the stdlib's `tokenize`; run as a script, its folder would come first
# on sys.path and shadow it for linecache, inspect and friends. Drop the folder before imports.
sys.path = [p for p in sys.path if p not in ("", __file__.rpartition("/")[0] or ".")]

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

DEFAULT_DIR = Path("data/raw/m21-keyboard")


def best_rate(fn: Callable[[Path], object], files: list[Path], repeat: int) -> float:
    """Files per second over the whole list, best of `repeat` passes (one warm-up first)."""
    fn(files[0])
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for f in files:
            fn(f)
        best = min(best, time.perf_counter() - t0)
    return len(files) / best


def miditok_tokenizers() -> dict[str, object]:
    import miditok  # needs huggingface_hub<2 (pinned in the dev extra)

    config = miditok.TokenizerConfig(
        pitch_range=(21, 109),
        beat_res={(0, 4): 8, (4, 8): 8},  # 60-tick grid at 480 tpb, durations to 8 beats
        num_velocities=64,
        special_tokens=["PAD", "EOS"],
        use_chords=True,
        use_rests=True,
        use_tempos=True,
        num_tempos=32,
        tempo_range=(30, 240),
        log_tempos=True,
    )
    return {"remi": miditok.REMI(config), "cp": miditok.CPWord(config)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--midi-dir", type=Path, default=None, help="folder of .mid files")
    parser.add_argument("--repeat", type=int, default=3, help="passes; the best one counts")
    parser.add_argument("--limit", type=int, default=0, help="first N files only (0 = all)")
    args = parser.parse_args()

    from musegen.core.midi import load_midi, read_score
    from musegen.core.tokenizer import get_tokenizer

    midi_dir = args.midi_dir or DEFAULT_DIR
    if not midi_dir.is_dir():
        raise SystemExit(
            f"{midi_dir}: no such folder; run `musegen corpus build` or pass --midi-dir"
        )
    files = sorted(midi_dir.rglob("*.mid"))[: args.limit or None]
    if not files:
        raise SystemExit(f"{midi_dir}: no .mid files found")
    notes = sum(len(read_score(f).notes) for f in files)
    print(f"{len(files)} files, {notes} notes from {midi_dir}; best of {args.repeat} passes\n")

    peers = miditok_tokenizers()
    rows = []
    for rep in ("remi", "cp"):
        ours = get_tokenizer(rep)
        fast = best_rate(ours.encode, files, args.repeat)
        slow = best_rate(lambda f, t=ours: t.encode(load_midi(f)), files, args.repeat)
        peer = best_rate(peers[rep].encode, files, args.repeat)
        rows.append((rep, fast, slow, peer))
    parse_sym = best_rate(read_score, files, args.repeat)
    parse_mtk = best_rate(load_midi, files, args.repeat)

    print(f"{'':6}{'musegen':>12}{'musegen+mtk':>14}{'MidiTok':>12}{'speed-up':>10}  (files/s)")
    for rep, fast, slow, peer in rows:
        print(f"{rep:6}{fast:12.1f}{slow:14.1f}{peer:12.1f}{fast / peer:9.1f}x")
    print(
        f"\nparse only: symusic read_score {parse_sym:.1f} files/s, "
        f"miditoolkit load_midi {parse_mtk:.1f} files/s ({parse_sym / parse_mtk:.0f}x)"
    )
    print("musegen+mtk = musegen tokenizer on a miditoolkit parse (the pre-symusic path)")


if __name__ == "__main__":
    main()
