"""Generation: load a checkpoint, decode word by word with a KV cache, stop cleanly, save MIDI.

A CP word is drawn type first, then its other fields given the sampled type (the model's
type-first heads, Hsiao et al. 2021); a REMI token is one draw. Each new word costs one
model step: its keys/values join a cache trimmed to `max_len - 1` positions, so the cost
per word is constant and a piece can run for as long as asked (a sliding window; see
`musegen.core.model.KVCache` for what it equals).

Grammar masks keep every output decodable (`tokenizer.check(out) == 0`): the tokenizer's
`Grammar` (the rules its `check` and `decode` read words by) says which ids may come next
given each piece's `GrammarState`. The masks act on the logits before sampling, so greedy or
extreme temperatures still give legal words.

`use_sequential_fields`: the model has no input for the fields already drawn in a word, so
the sequential mode is a *mask*, not model conditioning. Fields are drawn in order and each is
restricted by the ones drawn before it: bar_beat first decides whether tempo/chord (Position)
or rest (Bar) may carry a value, and a Note keeps the tokenizer's canonical order within a
position (pitch not below the previous note's, then duration and velocity for an equal pitch),
so the output re-encodes to itself. The default mode draws every field independently given the
type (the official CP sampler) and then sets the fields its bar_beat rules out to Ignore; the
two modes give the same distribution for Metrical words and differ only in the note order rule.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from musegen.config import at_least, check_values, read_yaml
from musegen.core.checkpoint import CheckpointError
from musegen.core.checkpoint import load as load_checkpoint
from musegen.core.model import Decoder, ModelConfig, MusicTransformer
from musegen.core.sampling import SampleParams, loop_guard, mask_logits, sample_field
from musegen.core.tokenizer import (
    BAR,
    BAR_BEAT,
    CHORD,
    DURATION,
    EOS,
    FIELDS,
    METRICAL,
    NOTE,
    OPENS,
    PITCH,
    REST,
    TEMPO,
    TYPE,
    VELOCITY,
    GrammarState,
    Tokenizer,
    from_vocab,
)

#: fields of a CP word in draw order after the type (the column order of FIELDS)
_NON_TYPE = tuple(range(1, len(FIELDS)))
#: fields the loop guard may forbid a repeated word's value in, most musical first
_GUARD_ORDER = (PITCH, DURATION, VELOCITY, BAR_BEAT, CHORD, TEMPO, REST)


@dataclass(frozen=True)
class GenerateParams:
    """The `generate` section of params.yaml (`config.load_section(GenerateParams, ...)`).

    Attributes:
        checkpoint: default --checkpoint, a .pt file or a `models:/NAME@ALIAS` URI.
        num_samples: pieces per call (--n); piece i uses seed + i.
        max_bars: cap on bars per piece, prompt included; 0 = no cap.
        min_bars: bars per piece before it may end, prompt included (EOS is masked until then;
            at most max_bars): a piece asked for 16 bars holds 16. 0 = the model may end it.
        max_minutes: cap on music time per piece (tempo events, else 120 BPM); 0 = no cap.
        max_words: cap on sampled words (CP) or tokens (REMI) after the prompt; 0 = no cap.
        prompt_bars: bars of --prompt kept as the opening.
        out_dir: where MIDI (and MP3/PNG) files and generate.json go.
        device: auto (CUDA when present) | cpu | cuda.
    """

    checkpoint: str
    num_samples: int
    max_bars: int
    min_bars: int
    max_minutes: float
    max_words: int
    prompt_bars: int
    out_dir: str
    device: str

    def __post_init__(self) -> None:
        check_values(
            self,
            "generate",
            {
                "num_samples": at_least(1),
                "max_bars": at_least(0, "(0 = no cap)"),
                "min_bars": at_least(0, "(0 = the model may end a piece)"),
                "max_minutes": at_least(0.0, "(0 = no cap)"),
                "max_words": at_least(0, "(0 = no cap)"),
                "prompt_bars": at_least(1),
            },
        )


@dataclass
class Loaded:
    """A checkpoint ready to generate: build with `load_model(path)`."""

    model: MusicTransformer
    tokenizer: Tokenizer
    vocab: dict[str, Any]
    step: int
    config: ModelConfig
    checkpoint: Path
    mlflow_run_id: str | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fields(self) -> list[str]:
        """Field names the model emits (CP: 8, type first; REMI: ["token"])."""
        return list(self.vocab["fields"])


def load_model(checkpoint: Path | str, device: str = "auto") -> Loaded:
    """Load a training checkpoint (step_<STEP>.pt or best.pt) for generation.

    Args:
        checkpoint: the .pt file written by `musegen train`.
        device: auto (CUDA when present), cpu or cuda.

    Returns:
        The model in eval mode on `device`, its tokenizer rebuilt from the stored vocab.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a musegen checkpoint (the message names it and the fix).
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)  # checked: keys, model_config, names, shapes, finite
    config = ModelConfig(**ckpt["model_config"])
    try:
        tokenizer = from_vocab(ckpt["vocab"], path)
    except (KeyError, TypeError) as exc:  # a vocab dict with parts missing
        raise CheckpointError(
            path, f"its vocab is incomplete ({type(exc).__name__}: {exc})"
        ) from None
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else device
    dev = "cpu" if dev == "auto" else dev
    model = MusicTransformer(config)
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        vocab=dict(ckpt["vocab"]),
        step=int(ckpt.get("step", 0)),
        config=config,
        checkpoint=path,
        mlflow_run_id=ckpt.get("mlflow_run_id"),
    )


# ---- the decoding loop -------------------------------------------------------------------
def generate(
    loaded: Loaded,
    sample: SampleParams,
    *,
    prompt: np.ndarray | None = None,
    max_words: int | None = None,
    max_bars: int | None = None,
    min_bars: int = 0,
    max_minutes: float | None = None,
    seed: int = 0,
    progress: bool = False,
    trace: list[Tensor] | None = None,
    stats: dict[str, Any] | None = None,
) -> np.ndarray:
    """Compose one piece, word by word, until EOS or a cap (a batch of one: `generate_batch`).

    Args:
        loaded: from `load_model`.
        sample: per-field temperature / top-p, sequential mode and loop guard.
        prompt: opening words (CP (n, F) or REMI (n,)), kept bit-exact; None starts from a
            Bar word (REMI: a Bar token). It must not contain EOS.
        max_words: cap on sampled words (CP) or tokens (REMI) after the prompt.
        max_bars: cap on bars in the piece, prompt included.
        min_bars: bars the piece holds before it may end, prompt included: EOS (and a rest
            past bar min_bars - 1) is masked until the piece is in bar `min_bars` (0-based),
            so only a cap can stop it sooner. With min_bars = max_bars = N the piece ends at
            the Bar word of bar N: exactly N bars.
        max_minutes: cap on music time (tempo events generated, else 120 BPM).
        seed: seeds the piece's torch.Generator; same seed, same piece (alone or in a batch).
        progress: show a tqdm bar with words/s.
        trace: if a list, each step's type (REMI: token) logits (1, V_0) are appended before
            masking (tests compare them with a full recompute).
        stats: if a dict, `bars` is set to the bars the piece closed (a bar closes when the next
            Bar word or EOS comes; a word or time cap leaves the last one open), so a caller
            can tell a piece that holds `min_bars` bars from one a cap cut short.

    Returns:
        The array, prompt first, ending with exactly one EOS; `loaded.tokenizer.decode` reads it.
        A cap ends the piece before the first word past it (an unfinished REMI word is dropped).

    Raises:
        ValueError: the prompt has the wrong shape, ids out of range, or an EOS.
    """
    caps = {"max_words": max_words, "max_bars": max_bars, "max_minutes": max_minutes}
    found: list[dict[str, Any]] = []
    (out,) = generate_batch(
        loaded, sample, [prompt], [seed], **caps, min_bars=min_bars, progress=progress,
        trace=trace, stats=found,
    )  # fmt: skip
    if stats is not None:
        stats.update(found[0])
    return out


def generate_batch(
    loaded: Loaded,
    sample: SampleParams,
    prompts: Sequence[np.ndarray | None],
    seeds: Sequence[int],
    *,
    max_words: int | None = None,
    max_bars: int | None = None,
    max_minutes: float | None = None,
    min_bars: int = 0,
    progress: bool = False,
    trace: list[Tensor] | None = None,
    stats: list[dict[str, Any]] | None = None,
) -> list[np.ndarray]:
    """Compose len(prompts) pieces at once: one model step per word feeds every piece.

    Piece i continues prompts[i] (None: from a Bar word) with its own random stream
    (seeds[i]), grammar state, loop guard and stop, so it equals `generate(..., seed=seeds[i])`
    alone; a finished piece leaves the batch. Arguments and returns as `generate`, one per
    piece; `trace` gets (B_active, V_0) per step; `stats`, if a list, gets one dict per piece.
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"generate_batch: {len(prompts)} prompts but {len(seeds)} seeds")
    sample.require_fields(loaded.fields)
    cp = loaded.tokenizer.representation == "cp"
    starts = [_start(loaded, p) for p in prompts]
    device = loaded.device
    from tqdm import tqdm

    unit = "word" if cp else "token"
    run = _Run(
        loaded,
        sample,
        Decoder(loaded.model, len(starts)),
        max_words,
        max_bars,
        max_minutes * 60.0 if max_minutes is not None else None,
        trace,
        tqdm(total=max_words, unit=unit, disable=not progress, desc="generate"),
        min_bars=min_bars,
    )
    # One word is a few small matmuls: on CPU, thread hand-offs cost more than they save
    # (measured on 2 busy cores: 300 words in 13.5 s with 2 threads, 0.6 s with 1), so
    # decoding runs single-threaded and the caller's setting is restored afterwards.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            pieces, primed = [], []
            for i, (words, seed) in enumerate(zip(starts, seeds, strict=True)):
                x = torch.as_tensor(words if cp else words[:, None], device=device)
                primed.append(run.decoder.prime(i, x))
                gen = torch.Generator(device=device).manual_seed(int(seed))
                pieces.append(_Piece(words, gen))
            run.h = torch.stack(primed)  # (B, D)
            outs = _run_cp(run, pieces) if cp else _run_remi(run, pieces)
            if stats is not None:
                stats.extend({"bars": p.closed_bars} for p in pieces)
            return outs
    finally:
        torch.set_num_threads(threads)
        run.bar.close()


@dataclass
class _Run:
    """What one generate_batch call's loop needs (fixed for the call)."""

    loaded: Loaded
    sample: SampleParams
    decoder: Decoder
    max_words: int | None
    max_bars: int | None
    max_seconds: float | None
    trace: list[Tensor] | None
    bar: Any  # tqdm
    h: Tensor | None = None  # (B, D): row i predicts the next word of the batch's piece i
    min_bars: int = 0
    mask_cache: dict[bool, dict[bytes, Tensor]] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def settings(self) -> tuple[tuple[float, float], ...]:
        """(temperature, top_p) of each field the model emits, in field order (fixed per call)."""
        return tuple(self.sample.field(name) for name in self.loaded.fields)

    @functools.cached_property
    def device(self) -> torch.device:
        return self.loaded.device  # looked up once: it walks the model's parameters

    def words_done(self, n_new: int) -> bool:
        return self.max_words is not None and n_new >= self.max_words

    def banned(self, history: list) -> list:
        """The loop guard's forbidden continuations of `history` (empty when it is off)."""
        period, repeats = self.sample.loop_max_period, self.sample.loop_max_repeats
        if period <= 0 or repeats <= 0:
            return []
        return loop_guard(np.array(history[-period * repeats :]), period, repeats)

    def masks(self, rows: Sequence[np.ndarray], *, padded: bool = False) -> Tensor:
        """(B, V) bool tensor of one grammar mask per piece on the device; `padded`: rows are
        CP field masks side by side, laid out (B, F-1, V_max) as `_padded` lays the logits.

        Each distinct mask becomes a tensor once per call of generate_batch (a piece's masks
        take a few dozen values), so a word costs one stack instead of a conversion per piece.
        """
        cache = self.mask_cache.setdefault(padded, {})
        out = []
        for m in rows:
            t = cache.get(key := m.tobytes())
            if t is None:
                t = torch.from_numpy(np.array(m, bool)).to(self.device)
                if padded:
                    t = F.pad(t, (0, 1), value=False)[_padded(tuple(self.decoder.split), t.device)]
                cache[key] = t
            out.append(t)
        return torch.stack(out)

    def uniforms(self, pieces: list[_Piece], n: int) -> Tensor:
        """(B, n) uniforms, row i from piece i's own generator (batch-independent draws)."""
        return torch.stack([torch.rand(n, generator=p.gen, device=self.device) for p in pieces])

    def step(self, pieces: list[_Piece], rows: list[int], words: np.ndarray) -> list[_Piece]:
        """Feed each piece in `rows` its new word; pieces not in rows leave the batch."""
        if len(rows) < len(pieces):
            self.decoder.keep(torch.tensor(rows, dtype=torch.long, device=self.device))
            pieces = [pieces[r] for r in rows]
        if pieces:
            x = torch.as_tensor(words[rows], device=self.device)  # (B, F)
            self.h = self.decoder.step(x)  # (B, D)
        self.bar.update(1)
        return pieces


@dataclass
class _Piece:
    """One piece of a batch: its words so far, random stream and grammar state."""

    prompt: np.ndarray
    gen: torch.Generator
    state: GrammarState = dataclasses.field(default_factory=GrammarState)
    out: list = dataclasses.field(default_factory=list)  # CP rows or REMI ids, prompt first
    result: np.ndarray | None = None  # set when the piece ends
    cur: np.ndarray | None = None  # REMI: the word being written (later fields may come)
    cur_start: int = 0  # REMI: index of its first token
    closed_bars: int = 0  # set when the piece ends (generate's `stats`)


def _start(loaded: Loaded, prompt: np.ndarray | None) -> np.ndarray:
    """The prompt as int64 after checks, or the opening Bar word / token."""
    tok = loaded.tokenizer
    if prompt is None:
        bar = np.zeros((1, len(FIELDS)), np.int64)
        bar[0, TYPE], bar[0, BAR_BEAT] = METRICAL, BAR
        return bar if tok.representation == "cp" else tok.from_words(bar).astype(np.int64)
    prompt = np.asarray(prompt)
    if not len(prompt):
        raise ValueError("prompt: empty; pass None to start from a Bar word")
    words, _ = tok.to_words(prompt)  # raises on wrong shape or out-of-range ids
    if (words[:, TYPE] == EOS).any():
        raise ValueError("prompt: it contains an EOS word, so the piece is over; drop the EOS")
    return prompt.astype(np.int64)


def _run_cp(run: _Run, pieces: list[_Piece]) -> list[np.ndarray]:
    eos = np.zeros(len(FIELDS), np.int64)
    eos[TYPE] = EOS
    everyone = list(pieces)
    for p in pieces:
        for w in p.prompt:
            p.state.apply(w)
        p.out = list(p.prompt)
    n_new = 0
    while pieces and not run.words_done(n_new):
        words = _draw_words(run, pieces, run.h, [{} for _ in pieces], trace=True)
        # the loop guard: a word that continues a loop is drawn again with one more field's
        # value forbidden, most musical first, until it is no loop or every field was tried
        forbid = [{} for _ in pieces]
        order = [iter(_GUARD_ORDER) for _ in pieces]
        redo = list(range(len(pieces)))
        while redo:
            again = []
            for r in redo:
                banned = run.banned(pieces[r].out)
                f = next(order[r], None) if tuple(words[r].tolist()) in banned else None
                if f is not None:
                    forbid[r].setdefault(f, set()).add(int(words[r, f]))
                    again.append(r)
            if again:
                sub = [pieces[r] for r in again]
                h = run.h[again]
                words[again] = _draw_words(run, sub, h, [forbid[r] for r in again])
            redo = again
        keep = []
        for r, (p, w) in enumerate(zip(pieces, words, strict=True)):
            if w[TYPE] == EOS or p.state.exceeds(w, run.max_bars, run.max_seconds):
                # EOS or a next Bar word closes the current bar; a time cap leaves it open
                p.closed_bars = p.state.bar + int(w[TYPE] == EOS or w[BAR_BEAT] == BAR)
                p.result = np.stack([*p.out, eos]).astype(np.int32)
                continue
            p.state.apply(w)
            p.out.append(w)
            keep.append(r)
        pieces = run.step(pieces, keep, words)
        n_new += 1
    for p in pieces:  # the word cap: the current bar is still open
        p.closed_bars = p.state.bar
        p.result = np.stack([*p.out, eos]).astype(np.int32)
    return [p.result for p in everyone]


def _draw_words(
    run: _Run,
    pieces: list[_Piece],
    h: Tensor,
    forbid: list[dict[int, set[int]]],
    *,
    trace: bool = False,
) -> np.ndarray:
    """One CP word per piece (B, F): the type, then each other field given it (grammar masks).

    Every field is one batched draw; each piece's masks come from its own grammar state, and
    the loop guard's `forbid` (field -> ids) narrows them where it leaves a choice.
    """
    dec, seq, grammar = run.decoder, run.sample.use_sequential_fields, run.loaded.tokenizer.grammar
    settings = run.settings
    u = run.uniforms(pieces, len(FIELDS))  # (B, F): every field draws, forced or not
    type_logits = dec.type_logits(h)  # (B, V_type)
    if trace and run.trace is not None:
        run.trace.append(type_logits.clone())
    allowed = [grammar.type_mask(p.state, sequential=seq, min_bars=run.min_bars) for p in pieces]
    kinds = sample_field(
        mask_logits(type_logits, run.masks(allowed)), *settings[TYPE], u=u[:, TYPE]
    )
    w = np.zeros((len(pieces), len(FIELDS)), np.int64)
    w[:, TYPE] = kinds.cpu().numpy()

    def field_mask(r: int, f: int) -> np.ndarray:
        m = grammar.field_mask(f, w[r], pieces[r].state, sequential=seq, min_bars=run.min_bars)
        if f in forbid[r]:
            narrowed = m.copy()
            narrowed[list(forbid[r][f])] = False
            m = narrowed if narrowed.any() else m  # the guard never empties a field
        return m

    logits = dec.field_logits(h, kinds)  # (B, sum V_f): an EOS row's are drawn and dropped
    if seq:  # each field's masks depend on the fields drawn before it: one draw per field
        for f, part in zip(_NON_TYPE, logits.split(dec.split, -1), strict=True):
            allowed = [field_mask(r, f) for r in range(len(pieces))]
            ids = sample_field(mask_logits(part, run.masks(allowed)), *settings[f], u=u[:, f])
            w[:, f] = ids.cpu().numpy()
    else:  # independent given the type: every field of every piece in one draw
        allowed = [np.concatenate([field_mask(r, f) for f in _NON_TYPE]) for r in range(len(w))]
        pad = _padded(tuple(dec.split), h.device)  # (F-1, V_max)
        logits = F.pad(logits, (0, 1), value=float("-inf"))[:, pad]  # (B, F-1, V_max)
        n = len(pieces) * len(_NON_TYPE)
        ids = sample_field(
            mask_logits(logits, run.masks(allowed, padded=True)).view(n, -1),  # (B*(F-1), V_max)
            *_per_row(settings[1:], len(pieces), h.device),
            u=u[:, 1:].reshape(n),
        )
        w[:, 1:] = ids.view(len(pieces), -1).cpu().numpy()
        for row in w:
            grammar.repair(row)
    return w


@functools.lru_cache(maxsize=64)  # a tune study asks for a few settings per batch size
def _per_row(
    settings: tuple[tuple[float, float], ...], pieces: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(temperatures, top_ps) of the non-type fields repeated for `pieces` pieces: one row each
    of the (pieces * (F-1), V_max) draw."""
    temps, tops = (torch.tensor(s, device=device) for s in zip(*settings, strict=True))
    return temps.repeat(pieces), tops.repeat(pieces)


@functools.cache
def _padded(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """Index (F-1, V_max) that lays the Decoder's field_logits (sizes side by side) out as one
    row per field, padded with index sum(sizes) (a -inf logit / False mask column)."""
    v_max, start, rows = max(sizes), 0, []
    for v in sizes:
        rows.append([start + i if i < v else sum(sizes) for i in range(v_max)])
        start += v
    return torch.tensor(rows, device=device)


def _run_remi(run: _Run, pieces: list[_Piece]) -> list[np.ndarray]:
    tok = run.loaded.tokenizer
    grammar = tok.grammar
    temp, top_p = run.sample.field(run.loaded.fields[0])
    everyone = list(pieces)
    for p in pieces:
        words, starts = tok.to_words(p.prompt)
        for w in words[:-1]:
            p.state.apply(w)
        p.cur, p.cur_start, p.out = words[-1].copy(), int(starts[-1]), p.prompt.tolist()
    n_new = 0
    while pieces and not run.words_done(n_new):
        logits = run.decoder.type_logits(run.h)  # (B, V)
        if run.trace is not None:
            run.trace.append(logits.clone())
        rows = []
        for p in pieces:
            allowed = grammar.token_mask(p.cur, p.state, min_bars=run.min_bars)
            banned = run.banned(p.out)
            if banned:
                narrowed = allowed.copy()
                narrowed[banned] = False
                # the guard never empties the choice: with nothing left, the loop continues
                allowed = narrowed if narrowed.any() else allowed
            rows.append(allowed)
        u = run.uniforms(pieces, 1)[:, 0]
        drawn = sample_field(mask_logits(logits, run.masks(rows)), temp, top_p, u=u)
        keep, tokens = [], drawn.cpu().numpy()
        for r, (p, t) in enumerate(zip(pieces, tokens.tolist(), strict=True)):
            f = int(grammar.field_of[t])
            if f == TYPE or f in OPENS:  # EOS or a new word: the current one is complete
                if p.state.exceeds(p.cur, run.max_bars, run.max_seconds):
                    is_bar = p.cur[TYPE] == METRICAL and p.cur[BAR_BEAT] == BAR
                    p.closed_bars = p.state.bar + int(is_bar)
                    p.result = _close_remi(p.out[: max(p.cur_start, len(p.prompt))])
                    continue
                p.state.apply(p.cur)
                if f == TYPE:
                    p.closed_bars = p.state.bar + 1
                    p.result = _close_remi(p.out)
                    continue
                p.cur = np.zeros(len(FIELDS), np.int64)
                p.cur[TYPE] = OPENS[f]
                p.cur_start = len(p.out)
            p.cur[f] = grammar.value_of[t]
            p.out.append(t)
            keep.append(r)
        pieces = run.step(pieces, keep, tokens[:, None])
        n_new += 1
    for p in pieces:  # the word cap: drop an unfinished Note, or a last word past a cap
        p.closed_bars = p.state.bar
        unfinished = p.cur[TYPE] == NOTE and not p.cur[VELOCITY]
        if unfinished or p.state.exceeds(p.cur, run.max_bars, run.max_seconds):
            p.out = p.out[: max(p.cur_start, len(p.prompt))]
        p.result = _close_remi(p.out)
    return [p.result for p in everyone]


def _close_remi(tokens: list[int]) -> np.ndarray:
    return np.array([*tokens, 1], np.int32)  # 1 = EOS


def prompt_of(tokenizer: Tokenizer, array: np.ndarray, prompt_bars: int) -> np.ndarray:
    """The opening of an encoded piece up to (not including) the Bar that starts bar `prompt_bars`.

    Bars count the way the decoder does (a Rest_k on a Bar word skips k bars); a piece with
    fewer bars gives all of it without its EOS.
    """
    array = np.asarray(array)
    words, starts = tokenizer.to_words(array)
    bar, cut = -1, None
    for w, start in zip(words, starts.tolist(), strict=True):
        if w[TYPE] == EOS:
            cut = start
            break
        if w[TYPE] == METRICAL and w[BAR_BEAT] == BAR:
            bar += 1 + int(w[REST])
            if bar >= prompt_bars:
                cut = start
                break
    return array[:cut].copy()


def continue_midi(
    loaded: Loaded,
    sample: SampleParams,
    midi_path: Path | str,
    prompt_bars: int,
    **caps: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Continue a MIDI file: its first `prompt_bars` bars are the prompt, kept bit-exact.

    Args:
        loaded: from `load_model`.
        sample: sampling settings.
        midi_path: the MIDI file to continue.
        prompt_bars: bars kept (cut at the bar line); >= 1.
        **caps: max_words, max_bars, max_minutes, seed, progress (as `generate`).

    Returns:
        (prompt array, full array); full[:len(prompt)] equals prompt.

    Raises:
        MidiError: the file cannot be read.
        ValueError: prompt_bars < 1, or the file has no notes to continue from.
    """
    prompt = midi_prompt(loaded.tokenizer, midi_path, prompt_bars)
    return prompt, generate(loaded, sample, prompt=prompt, **caps)


def midi_prompt(tokenizer: Tokenizer, midi_path: Path | str, prompt_bars: int) -> np.ndarray:
    """The first `prompt_bars` bars of a MIDI file as a prompt (`continue_midi`'s opening).

    Raises:
        MidiError: the file cannot be read.
        ValueError: prompt_bars < 1, or the file has no notes to continue from.
    """
    if prompt_bars < 1:
        raise ValueError(f"prompt_bars {prompt_bars}: expected >= 1 (use no prompt instead)")
    prompt = prompt_of(tokenizer, tokenizer.encode(midi_path), prompt_bars)
    if len(prompt) == 0:
        raise ValueError(f"{midi_path}: no words before bar {prompt_bars}; pick a file with notes")
    return prompt


# ---- sampling settings, model references, files ------------------------------------------


def bundled_sampling(checkpoint: Path) -> SampleParams | None:
    """The sampling a registered bundle holds beside its checkpoint (None for a bare .pt).

    A model version downloaded by `resolve_checkpoint` has artifacts/checkpoint.pt and
    artifacts/sampling.yaml (musegen.stages.register): the settings tuned for that STEP.
    """
    path = Path(checkpoint).with_name("sampling.yaml")
    if not path.is_file():
        return None
    return SampleParams(**read_yaml(path))


def resolve_checkpoint(ref: str | Path, dst: Path | None = None) -> Path:
    """A checkpoint file from a path or an MLflow URI (`models:/musegen@champion`, `runs:/…`).

    For a URI the artifacts are downloaded (to `dst`, else a temp folder) from the tracking
    store (`tracking.open_store`) and the one .pt file inside is returned; a registered pyfunc
    holds it under its artifact key "checkpoint".

    Raises:
        TrackingError: no tracking store (outside the repository, or nothing trained yet).
        FileNotFoundError: a path that does not exist, a URI the store lacks, or artifacts
            with no .pt file.
        ValueError: artifacts holding several .pt files and none under "checkpoint".
    """
    text = str(ref)
    if "://" not in text and not text.startswith(("models:/", "runs:/")):
        return Path(text)
    import mlflow
    from musegen import tracking

    uri = tracking.open_store()  # the repository's store, never MLflow's default ./mlflow.db
    try:
        local = Path(mlflow.artifacts.download_artifacts(text, dst_path=dst and str(dst)))
    except mlflow.exceptions.MlflowException as exc:  # no such model, version, alias or run
        raise FileNotFoundError(
            f"{text}: not found in the MLflow store {uri} ({exc.message[:200]}); "
            "register one with `musegen register` (or `make demo`)"
        ) from exc
    if local.is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():  # a pyfunc lists its artifacts by key: python_function.artifacts
        flavor = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})
        entry = (flavor.get("artifacts") or {}).get("checkpoint")
        if entry and (local / entry["path"]).is_file():
            return local / entry["path"]
    found = sorted(local.rglob("*.pt"))
    if not found:
        raise FileNotFoundError(f"{text}: downloaded to {local}, but it holds no .pt checkpoint")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(local)) for p in found[:4])
        raise ValueError(f"{text}: several checkpoints ({names}); log one under 'checkpoint'")
    return found[0]


def piece_seconds(tokenizer: Tokenizer, array: np.ndarray) -> float:
    """Music time of a generated array: the last note's end under its tempo changes."""
    from musegen.core.midi import to_score

    return to_score(tokenizer.decode(array)).seconds()


def write_samples(
    loaded: Loaded,
    sample: SampleParams,
    params: GenerateParams,
    out_dir: Path,
    *,
    prompt: Path | None = None,
    seed: int = 0,
    mp3: bool = False,
    roll: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Generate `params.num_samples` pieces into `out_dir` (MIDI, optional MP3/PNG, JSON log).

    Piece i uses seed + i and is named `<prompt stem or "sample">_seed<seed + i>.mid`.
    The pieces decode as one batch; generate.json records the checkpoint, sampling settings,
    every piece's words and music seconds, and the batch's compute seconds and words/s.

    Returns:
        The MIDI paths.
    """
    import json

    from musegen.core.render import piano_roll, render_audio

    out_dir.mkdir(parents=True, exist_ok=True)
    caps = {
        "max_words": params.max_words or None,
        "max_bars": params.max_bars or None,
        "min_bars": min(params.min_bars, params.max_bars or params.min_bars),
        "max_minutes": params.max_minutes or None,
    }
    stem = prompt.stem if prompt is not None else "sample"
    head = midi_prompt(loaded.tokenizer, prompt, params.prompt_bars) if prompt else np.zeros(0)
    seeds = [seed + i for i in range(params.num_samples)]
    t0 = time.perf_counter()  # the pieces decode as one batch
    stats: list[dict[str, Any]] = []
    outs = generate_batch(
        loaded, sample, [head if prompt else None] * len(seeds), seeds, **caps,
        progress=progress, stats=stats,
    )  # fmt: skip
    took = time.perf_counter() - t0
    paths, log = [], []
    for piece_seed, out, got in zip(seeds, outs, stats, strict=True):
        midi = loaded.tokenizer.decode(out)
        path = out_dir / f"{stem}_seed{piece_seed}.mid"
        midi.dump(str(path))
        if mp3:
            render_audio(path, path.with_suffix(".mp3"))
        if roll:
            piano_roll(midi, path.with_suffix(".png"))
        paths.append(path)
        log.append({
            "file": path.name, "seed": piece_seed, "prompt_words": len(head),
            "words": len(out) - len(head),
            "seconds_music": round(piece_seconds(loaded.tokenizer, out), 2),
            "decode_errors": int(loaded.tokenizer.last_decode_errors),
            "bars": got["bars"], "complete": got["bars"] >= caps["min_bars"],
        })  # fmt: skip
    meta = {
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "mlflow_run_id": loaded.mlflow_run_id,
        "prompt": str(prompt) if prompt else None,
        "params": dataclasses.asdict(params),
        "sample": dataclasses.asdict(sample),
        "seconds_compute": round(took, 3),  # the whole batch
        "words_per_s": round(sum(p["words"] for p in log) / max(took, 1e-9), 1),
        "pieces": log,
    }
    (out_dir / "generate.json").write_text(json.dumps(meta, indent=1, default=dict) + "\n")
    return paths
