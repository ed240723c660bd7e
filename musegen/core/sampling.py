"""Sampling rules: per-field temperature and nucleus (top-p), masks and a loop guard.

Pure functions on logits, so they are tested without a model. The generation loop asks
`SampleParams` for a field's settings and calls `sample_field` once per field of a word
(type first, then the others given the sampled type, as in the CP paper).

Defaults live in params.yaml's `sample:` section: the official CP per-field table
(YatingMusic/compound-word-transformer, see research/music-models.md) and REMI's
temperature 1.2 for its single `token` field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from musegen.config import ParamsError, at_least, check_values

#: a temperature below this is greedy decoding (argmax); dividing by it would only
#: reproduce the argmax with extra rounding.
GREEDY_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SampleParams:
    """The `sample` section of params.yaml.

    Build it with `config.load_section(SampleParams, "sample")`, then apply CLI flags with
    `with_overrides`. Both maps are keyed by field name (CP: type, bar_beat, tempo, chord,
    pitch, duration, velocity, rest; REMI: token) and must hold the same keys.

    Attributes:
        temperature: field -> temperature; 0 means greedy (argmax).
        top_p: field -> nucleus mass in (0, 1]; 1.0 switches nucleus sampling off.
        use_sequential_fields: sample the non-type fields one after another, each seeing
            the ones before (False = independently given the type, as the official CP).
        loop_max_period: longest cycle (in words or tokens) the loop guard looks for;
            0 switches the guard off.
        loop_max_repeats: how many back-to-back copies of a cycle are allowed before the
            word that would continue it is forbidden.
        seed: seed for the sampling torch.Generator.
    """

    temperature: Mapping[str, float]
    top_p: Mapping[str, float]
    use_sequential_fields: bool
    loop_max_period: int
    loop_max_repeats: int
    seed: int

    def __post_init__(self) -> None:
        # errors name sample.<key> without a source: the loader adds the file, with_overrides
        # the CLI flag (config.ParamsError)
        temps, tops = dict(self.temperature), dict(self.top_p)
        if set(temps) != set(tops):
            odd = sorted(set(temps) ^ set(tops))
            raise ParamsError(
                f"sample.temperature and sample.top_p must name the same fields; "
                f"{', '.join(odd)} is in only one of them (add it to the other)",
                key="temperature",
                problem="the same fields as sample.top_p",
            )
        number = (int, float)
        rules = {
            f"temperature.{n}": (
                t,
                isinstance(t, number) and math.isfinite(t) and t >= 0,
                "a finite number >= 0 (0 = greedy)",
            )
            for n, t in temps.items()
        }
        rules |= {
            f"top_p.{n}": (
                p,
                isinstance(p, number) and 0 < p <= 1,
                "a number in (0, 1] (1.0 = off)",
            )
            for n, p in tops.items()
        }
        for key, (value, ok, expected) in rules.items():
            if not ok:
                raise ParamsError(
                    f"sample.{key} = {value!r}: expected {expected}", key, f"expected {expected}"
                )
        check_values(
            self,
            "sample",
            {"loop_max_period": at_least(0, "(0 = off)"), "loop_max_repeats": at_least(0)},
        )
        # Own copies with float values, so a caller's dict cannot change a frozen params object.
        object.__setattr__(self, "temperature", {k: float(v) for k, v in temps.items()})
        object.__setattr__(self, "top_p", {k: float(v) for k, v in tops.items()})

    def field(self, name: str) -> tuple[float, float]:
        """Return (temperature, top_p) for field `name`.

        Raises:
            KeyError: the field has no settings; the message lists the known fields.
        """
        if name not in self.temperature:
            known = ", ".join(self.temperature)
            raise KeyError(f"params.yaml: sample has no settings for field {name!r} ({known})")
        return self.temperature[name], self.top_p[name]

    def require_fields(self, names: Iterable[str]) -> None:
        """Check that every field a model emits has settings (call once before generating).

        Raises:
            ValueError: naming the fields missing from params.yaml's `sample` section.
        """
        missing = [n for n in names if n not in self.temperature]
        if missing:
            raise ValueError(
                f"params.yaml: sample.temperature/top_p lack field(s) {', '.join(missing)} "
                f"that the model emits; add them to both maps"
            )

    def with_overrides(
        self, temperature: Sequence[str] = (), top_p: Sequence[str] = ()
    ) -> SampleParams:
        """Return a copy with CLI overrides such as ``["pitch=1.2"]`` applied.

        Raises:
            ValueError: an override names an unknown field or holds a bad number.
        """
        new_t = parse_overrides(temperature, self.temperature, "temperature")
        new_p = parse_overrides(top_p, self.top_p, "top-p")
        try:
            return dataclasses.replace(
                self, temperature={**self.temperature, **new_t}, top_p={**self.top_p, **new_p}
            )
        except ParamsError as exc:  # blame the flag when the bad value came from one
            section, _, field = (exc.key or "").partition(".")
            flags = {"temperature": ("--temperature", new_t), "top_p": ("--top-p", new_p)}
            flag, values = flags.get(section, ("", {}))
            if field not in values:
                raise
            message = f"{flag} {field}={values[field]:g}: {exc.problem} (sample.{exc.key})"
            raise ParamsError(message, exc.key, exc.problem) from None


def parse_overrides(items: Sequence[str], known: Iterable[str], flag: str) -> dict[str, float]:
    """Parse ``FIELD=VALUE`` strings from a repeated CLI flag into a dict.

    Args:
        items: e.g. ``["pitch=1.2", "duration=0.95"]`` from ``--temperature pitch=1.2``.
        known: the valid field names.
        flag: the flag's name, for error messages (``temperature``, ``top-p``).

    Returns:
        Field name -> float value.

    Raises:
        ValueError: malformed item, unknown or repeated field, or a value that is not a
            finite number; the message quotes the item and says what would be accepted.
    """
    known = list(known)
    out: dict[str, float] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--{flag} {item!r}: expected FIELD=VALUE, e.g. pitch=1.2")
        if name not in known:
            raise ValueError(
                f"--{flag} {item!r}: unknown field {name!r}; known fields: {', '.join(known)}"
            )
        if name in out:
            raise ValueError(f"--{flag} {item!r}: field {name!r} is given twice; keep one")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--{flag} {item!r}: {text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"--{flag} {item!r}: value must be finite")
        out[name] = value
    return out


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed ids to -inf (out of place).

    Args:
        logits: (B, V) or (V,) float logits.
        allowed: bool (V,) or (B, V); True keeps the id (a grammar's legal next ids).

    Returns:
        A new tensor like `logits`.
    """
    if allowed.dtype != torch.bool or allowed.shape[-1] != logits.shape[-1]:
        raise ValueError(
            f"mask_logits: allowed must be a bool tensor ending in V={logits.shape[-1]}, "
            f"got {allowed.dtype} {tuple(allowed.shape)}"
        )
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def forbid_ids(logits: torch.Tensor, ids: Iterable[int]) -> torch.Tensor:
    """Set the logits of `ids` to -inf in every row (out of place).

    Raises:
        ValueError: an id is outside [0, V).
    """
    vocab = logits.shape[-1]
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"forbid_ids: id(s) {bad} outside the field's vocabulary [0, {vocab})")
    allowed = torch.ones(vocab, dtype=torch.bool, device=logits.device)
    allowed[ids] = False
    return mask_logits(logits, allowed)


def loop_guard(history: Sequence[Any] | np.ndarray, max_period: int, max_repeats: int) -> list:
    """Return the items that would extend an exact cycle past `max_repeats` copies.

    The tail of `history` is a cycle of period p repeated r times when its last r*p items are
    r copies of the last p. If that holds for r = max_repeats, the next item that continues
    the cycle, history[-p], is returned so the caller can forbid it. Music repeats on
    purpose, so pick max_repeats above the usual 2-4 repeats of a phrase.

    Args:
        history: generated items, oldest first: ids (T,) or CP words (T, F).
        max_period: longest cycle to look for; 0 disables the guard.
        max_repeats: copies allowed; 0 disables the guard.

    Returns:
        Distinct items to forbid: ints for ids, tuples for words. Empty when no loop.
    """
    if max_period <= 0 or max_repeats <= 0:
        return []
    h = np.asarray(history)
    banned: list = []
    for p in range(1, max_period + 1):
        span = p * max_repeats
        if span > len(h):
            break
        window = h[len(h) - span :]
        # r copies of the last p items  <=>  the window equals itself shifted by p.
        if np.array_equal(window[:-p], window[p:]):
            nxt = h[len(h) - p]
            item = tuple(nxt.tolist()) if h.ndim > 1 else nxt.item()
            if item not in banned:
                banned.append(item)
    return banned


def sample_field(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    *,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one id per row with temperature and nucleus (top-p) filtering.

    Stable at any temperature: log-softmax subtracts the row maximum, so T=0.01 with logits
    of 1e4 does not overflow (the official CP numpy softmax did), and -inf mask entries get
    probability 0. Nucleus keeps the smallest prefix of ids, by descending probability
    (ties in id order), whose mass is >= top_p; the most likely id is always kept. A row's id
    is drawn by inverting its cumulative distribution at a uniform number, so a batch of
    pieces can give each row its own random stream (`u`): a piece is the same alone or in a
    batch.

    The rows are small (4 to a few hundred ids), so after torch's softmax the steps run in
    NumPy on the host, with torch's float32 arithmetic (cumulative sums accumulated in
    float64, as torch's CPU cumsum does): a NumPy op costs a microsecond where a torch op
    costs several, and the draws equal the all-torch version's (tests).

    Args:
        logits: (B, V) float logits; -inf marks forbidden ids.
        temperature: > GREEDY_EPS samples; below it (0 included) returns the argmax. A (B,)
            tensor gives each row its own (several fields drawn in one call; the caller
            checked the values, as SampleParams does).
        top_p: nucleus mass in (0, 1]; 1.0 keeps every id. Or a (B,) tensor, as temperature.
        generator: torch.Generator on the logits' device, for reproducible draws.
        u: (B,) uniforms in [0, 1), one per row (default: drawn from `generator`).

    Returns:
        (B,) int64 ids, on the logits' device.

    Raises:
        ValueError: bad shape, temperature < 0, top_p outside (0, 1], NaN/+inf logits, or a
            row with every id masked.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_field: logits must be (B, V), got {tuple(logits.shape)}")
    per_row = isinstance(temperature, torch.Tensor)
    if not per_row and not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"sample_field: temperature {temperature} must be finite and >= 0")
    if not isinstance(top_p, torch.Tensor) and not 0 < top_p <= 1:
        raise ValueError(f"sample_field: top_p {top_p} must be in (0, 1] (1.0 = off)")
    device = logits.device
    x = logits.detach().float().cpu().numpy()
    if not np.isfinite(x.max(axis=-1)).all():  # NaN or +inf anywhere, or a row all -inf
        if np.isnan(x).any() or np.isposinf(x).any():
            raise ValueError("sample_field: logits hold NaN or +inf; check the model's output")
        rows = np.flatnonzero(np.isneginf(x).all(axis=-1)).tolist()
        raise ValueError(
            f"sample_field: every id is masked in row(s) {rows}; the grammar or loop-guard "
            f"mask leaves nothing to sample — relax it"
        )
    if not per_row and temperature < GREEDY_EPS:
        return torch.from_numpy(x.argmax(axis=-1)).to(device)
    if per_row:
        temps = temperature.detach().float().cpu().numpy()
        scaled = x / np.maximum(temps, np.float32(GREEDY_EPS))[:, None]
    else:
        scaled = x / np.float32(temperature)
    probs = torch.softmax(torch.from_numpy(scaled), dim=-1).numpy()  # (B, V) float32
    tops = top_p.detach().float().cpu().numpy() if isinstance(top_p, torch.Tensor) else top_p
    if isinstance(tops, np.ndarray) or tops < 1.0:
        probs = np.where(_nucleus(probs, tops), probs, np.float32(0.0))
    if u is None:
        u = torch.rand(len(probs), generator=generator, device=device)
    cdf = _cumsum(probs)  # (B, V); the last column is the kept mass
    # the first id whose cumulative mass exceeds u * mass (zero-mass ids never qualify):
    # searchsorted(right=True) on a non-decreasing row is the count of entries <= the value
    target = u.detach().float().cpu().numpy() * cdf[:, -1]
    ids = np.minimum((cdf <= target[:, None]).sum(axis=-1), probs.shape[-1] - 1)
    # rounding can land u * mass on the total: fall back to the most likely id
    ids = np.where(probs[np.arange(len(ids)), ids] > 0, ids, probs.argmax(axis=-1))
    if per_row:
        ids = np.where(temps < GREEDY_EPS, x.argmax(axis=-1), ids)
    return torch.from_numpy(ids.astype(np.int64)).to(device)


def nucleus_mask(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Bool (B, V) mask of the nucleus: the smallest top-ranked set with mass >= top_p.

    Args:
        probs: (B, V) probabilities (rows sum to 1).
        top_p: nucleus mass in (0, 1]; 1.0 keeps every id with nonzero probability. A (B,)
            tensor gives each row its own.
    """
    p = probs.detach().cpu()
    p = (p if p.dtype in (torch.float32, torch.float64) else p.float()).numpy()
    if isinstance(top_p, torch.Tensor):
        top_p = top_p.detach().cpu().numpy().astype(p.dtype)
    return torch.from_numpy(_nucleus(p, top_p)).to(probs.device)


def _cumsum(x: np.ndarray) -> np.ndarray:
    """Row cumulative sums as torch's CPU cumsum gives them: float64 running sums, each
    rounded to x's dtype."""
    return x.cumsum(axis=-1, dtype=np.float64).astype(x.dtype)


def _nucleus(probs: np.ndarray, top_p: float | np.ndarray) -> np.ndarray:
    """`nucleus_mask` on a float array (top_p a float or a (B,) array of the same dtype).

    Sorts values, not ids (an argsort costs ~20x more at 56 x 134): the nucleus is every id
    above the probability of its last member, and of the ids tied with that one, the lowest
    first (the order a stable sort gives)."""
    per_row = isinstance(top_p, np.ndarray)
    if not per_row and top_p >= 1.0:
        return probs > 0
    sorted_p = -np.sort(-probs, axis=-1)  # (B, V), most likely first
    mass_before = _cumsum(sorted_p) - sorted_p  # mass of the ids ranked above each
    # the first id has 0 < top_p: always kept; a row with top_p 1.0 keeps every id
    size = (mass_before < (top_p[:, None] if per_row else probs.dtype.type(top_p))).sum(axis=-1)
    if per_row:
        size = np.where(top_p >= 1.0, probs.shape[-1], size)
    last = sorted_p[np.arange(len(probs)), size - 1][:, None]  # (B, 1): the last one kept
    above, tied = probs > last, probs == last
    room = size - above.sum(axis=-1)  # (B,): how many of the tied ids fit
    return (above | (tied & (np.cumsum(tied, axis=-1) <= room[:, None]))) & (probs > 0)
