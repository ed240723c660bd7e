"""Generation: cached decoding equals recompute, seeds, stopping rules, grammar, CLI, registry.

Checkpoints are randomly initialised MusicTransformers saved in the training format with the
real tokenizers' vocabularies (a tiny shape and a 16-word window, so the sliding window
slides within a few dozen words). Head biases steer a random model where a test needs a
known behaviour (never EOS, always a Bar word, ...).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import miditoolkit
import numpy as np
import pytest
import torch
import yaml
from miditoolkit.midi.utils import example_midi_file
from typer.testing import CliRunner

from musegen.config import ParamsError, load_section
from musegen.core import generate as gen
from musegen.core.model import ModelConfig, MusicTransformer
from musegen.core.sampling import SampleParams
from musegen.core.tokenizer import (
    BAR,
    BAR_BEAT,
    CHORD,
    DURATION,
    EOS,
    METRICAL,
    NOTE,
    PITCH,
    REST,
    TEMPO,
    TEMPO_BPM,
    TYPE,
    VELOCITY,
    get_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = load_section(SampleParams, "sample", ROOT / "params.yaml")
TINY = {"d_model": 32, "n_layer": 2, "n_head": 2, "d_ff": 64, "dropout": 0.0, "max_len": 16}


def save_random(
    path: Path, rep: str = "cp", *, seed: int = 0, attention: str = "relative", bias=None
) -> Path:
    """A random-init checkpoint in train.py's format; `bias` = {(field, id): value} on heads."""
    vocab = get_tokenizer(rep).vocab
    config = ModelConfig(
        vocab_sizes=vocab["sizes"], emb_sizes=[8] * len(vocab["sizes"]), attention=attention,
        **TINY,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = MusicTransformer(config)
    with torch.no_grad():
        for (f, i), value in (bias or {}).items():
            model.heads[f].bias[i] = value
    state = {"model": model.state_dict(), "model_config": dataclasses.asdict(config)}
    torch.save(state | {"vocab": vocab, "step": 5, "mlflow_run_id": None}, path)
    return path


def no_eos(rep: str) -> dict:
    return {(0, EOS if rep == "cp" else 1): -30.0}


def sample(**kw) -> SampleParams:
    return dataclasses.replace(SAMPLE, **kw)


def every(value: float) -> dict[str, float]:
    return dict.fromkeys(SAMPLE.temperature, value)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {rep: save_random(root / f"{rep}.pt", rep, bias=no_eos(rep)) for rep in ("cp", "remi")}


def bars_of(words: np.ndarray) -> int:
    """Bars a CP array spans, counted like the decoder (Bar words plus their rests)."""
    is_bar = (words[:, TYPE] == METRICAL) & (words[:, BAR_BEAT] == BAR)
    return int(is_bar.sum() + words[is_bar, REST].sum())


# ---- loading -----------------------------------------------------------------------------
def test_load_model_rebuilds_everything_from_the_checkpoint(ckpts: dict[str, Path]) -> None:
    loaded = gen.load_model(ckpts["cp"], device="cpu")
    assert not loaded.model.training and loaded.step == 5 and loaded.checkpoint == ckpts["cp"]
    assert loaded.tokenizer.representation == "cp" and loaded.fields[0] == "type"
    assert loaded.config.max_len == TINY["max_len"] and loaded.mlflow_run_id is None
    assert gen.load_model(ckpts["remi"]).fields == ["token"]


def test_load_model_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        gen.load_model(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pt: not a musegen checkpoint"):
        gen.load_model(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a musegen checkpoint.*'weights'"):
        gen.load_model(tmp_path / "other.pt")


# ---- cache equivalence -------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["relative", "absolute"])
@pytest.mark.parametrize("rep", ["cp", "remi"])
@pytest.mark.parametrize("with_prompt", [False, True], ids=["scratch", "prompt"])
def test_cached_steps_equal_full_recompute(
    tmp_path: Path, rep: str, attention: str, with_prompt: bool
) -> None:
    """Each step's logits equal model.hidden over the whole stream with window=max_len."""
    path = save_random(tmp_path / "m.pt", rep, attention=attention, bias=no_eos(rep))
    loaded = gen.load_model(path)
    prompt = None
    if with_prompt:  # 40 real words: longer than the 16-word window, so priming slides too
        prompt = gen.prompt_of(loaded.tokenizer, loaded.tokenizer.encode(example_midi_file()), 99)
        prompt = prompt[:40]
    trace: list[torch.Tensor] = []
    out = gen.generate(loaded, SAMPLE, prompt=prompt, max_words=48, seed=3, trace=trace)
    start = 1 if prompt is None else len(prompt)
    x = torch.as_tensor(out[:-1].astype(np.int64), device=loaded.device)  # drop the EOS
    x = x[None] if rep == "cp" else x[None, :, None]
    with torch.no_grad():
        h, _ = loaded.model.hidden(x, window=loaded.config.max_len)
        full = loaded.model.head_logits(h)[0][0]  # (T, V_0)
    compared = 0
    for i, step_logits in enumerate(trace):
        pos = start - 1 + i  # the word each step's hidden state reads
        if pos < full.size(0):  # REMI may drop an unfinished last word
            torch.testing.assert_close(step_logits[0], full[pos], atol=1e-5, rtol=1e-5)
            compared += 1
    assert compared >= 30 and full.size(0) > TINY["max_len"] * 2


# ---- reproducibility ---------------------------------------------------------------------
@pytest.mark.parametrize("rep", ["cp", "remi"])
def test_same_seed_same_piece_other_seed_other_piece(ckpts: dict[str, Path], rep: str) -> None:
    loaded = gen.load_model(ckpts[rep])
    a, b = (gen.generate(loaded, SAMPLE, max_words=60, seed=7) for _ in range(2))
    c = gen.generate(loaded, SAMPLE, max_words=60, seed=8)
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


@pytest.mark.parametrize(("rep", "sequential"), [("cp", True), ("cp", False), ("remi", False)])
def test_a_batch_equals_each_piece_alone(tmp_path: Path, rep: str, sequential: bool) -> None:
    """generate_batch == generate per piece: prompts of different lengths, pieces that stop
    at different words (EOS, the bar cap, the word cap), loop guard on, CP fields drawn one
    after another or all in one draw."""
    eos = (0, EOS if rep == "cp" else 1)
    loaded = gen.load_model(save_random(tmp_path / "m.pt", rep, bias={eos: -1.5}))
    tok = loaded.tokenizer
    prompt = gen.prompt_of(tok, tok.encode(example_midi_file()), 99)[:30]
    prompts, seeds = [None, prompt, prompt[:7], None, prompt[:12]], [3, 4, 5, 6, 7]
    s = sample(use_sequential_fields=sequential, loop_max_period=4, loop_max_repeats=2)
    caps = {"max_words": 40, "max_bars": 6}
    batch = gen.generate_batch(loaded, s, prompts, seeds, **caps)
    for p, seed, got in zip(prompts, seeds, batch, strict=True):
        np.testing.assert_array_equal(got, gen.generate(loaded, s, prompt=p, seed=seed, **caps))
        assert tok.check(got) == 0
    new_words = [len(b) - (0 if p is None else len(p)) for p, b in zip(prompts, batch, strict=True)]
    assert len(set(new_words)) > 2, new_words  # the pieces did stop at different steps
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        gen.generate_batch(loaded, s, [None, None], [1])


# ---- stopping ----------------------------------------------------------------------------
@pytest.mark.parametrize("rep", ["cp", "remi"])
def test_eos_ends_the_piece(tmp_path: Path, rep: str) -> None:
    loaded = gen.load_model(save_random(tmp_path / "m.pt", rep, bias={(0, 1): 40.0}))
    out = gen.generate(loaded, SAMPLE, max_words=50)
    # the opening Bar, then the sampled EOS: id 1 in the type field and in REMI
    assert len(out) == 2 and (out[-1, TYPE] if rep == "cp" else out[-1]) == EOS
    assert loaded.tokenizer.check(out) == 0


def bar_model(tmp_path: Path) -> gen.Loaded:
    """A model whose every word is a plain Bar (no rest): 2 s per bar at the default 120 BPM."""
    bias = {(TYPE, METRICAL): 40.0, (BAR_BEAT, BAR): 40.0, (REST, 0): 40.0}
    return gen.load_model(save_random(tmp_path / "bars.pt", bias=bias))


def test_max_bars_and_max_minutes_stop_before_the_first_word_past_them(tmp_path: Path) -> None:
    loaded = bar_model(tmp_path)
    out = gen.generate(loaded, SAMPLE, max_bars=5, max_words=100)
    assert bars_of(out) == 5 and len(out) == 6 and out[-1, TYPE] == EOS
    # bars start at 0, 2, 4 s; the one at 6 s is not before 0.1 minutes
    out = gen.generate(loaded, SAMPLE, max_minutes=0.1, max_words=100)
    assert bars_of(out) == 3 and loaded.tokenizer.check(out) == 0


def test_max_minutes_follows_generated_tempo(tmp_path: Path) -> None:
    """Bar, Position_0 with Tempo_59, Bar, ...: 4.09 s bars, so 0.2 minutes hold 3 (not 6)."""
    slow = 1 + int(np.argmin(np.abs(TEMPO_BPM - 60)))  # tempo id of the class nearest 60 BPM
    bias = {(TYPE, METRICAL): 40.0, (BAR_BEAT, BAR): 20.0, (BAR_BEAT, 2): 40.0}
    bias |= {(TEMPO, slow): 40.0, (CHORD, 0): 40.0, (REST, 0): 40.0}
    loaded = gen.load_model(save_random(tmp_path / "slow.pt", bias=bias))
    out = gen.generate(loaded, SAMPLE, max_minutes=0.2, max_words=100)
    assert bars_of(out) == 3 and loaded.tokenizer.check(out) == 0
    assert (out[:, TEMPO] == slow).sum() == 3
    # without the cap the same seed goes on: the cap, not chance, ended the piece
    assert bars_of(gen.generate(loaded, SAMPLE, max_minutes=0.4, max_words=100)) == 6


@pytest.mark.parametrize("rep", ["cp", "remi"])
def test_min_bars_holds_eos_back_until_the_piece_has_its_bars(tmp_path: Path, rep: str) -> None:
    """A model that always wants to stop (EOS logit +40) still writes exactly the bars asked."""
    loaded = gen.load_model(save_random(tmp_path / "m.pt", rep, bias={(0, 1): 40.0}))
    tok = loaded.tokenizer
    stats: dict = {}
    out = gen.generate(loaded, SAMPLE, max_bars=6, min_bars=6, max_words=3000, seed=1, stats=stats)
    words = out if rep == "cp" else tok._to_words(out)[0]
    assert bars_of(words) == 6 and stats["bars"] == 6 and tok.check(out) == 0
    assert (words[:-1, TYPE] != EOS).all() and words[-1, TYPE] == EOS
    # from a prompt: min_bars counts the prompt's bars too
    prompt = gen.prompt_of(tok, tok.encode(example_midi_file()), 2)
    full = gen.generate(loaded, SAMPLE, prompt=prompt, max_bars=5, min_bars=5, max_words=3000)
    assert bars_of(full if rep == "cp" else tok._to_words(full)[0]) == 5
    # 0 = the model decides: it stops at once; a word cap short of the bars is reported
    assert len(gen.generate(loaded, SAMPLE, min_bars=0, max_words=50)) == 2
    gen.generate(loaded, SAMPLE, max_bars=6, min_bars=6, max_words=5, stats=stats)
    assert stats["bars"] < 6


@pytest.mark.parametrize("rep", ["cp", "remi"])
def test_max_words_caps_sampled_words(ckpts: dict[str, Path], rep: str) -> None:
    loaded = gen.load_model(ckpts[rep])
    out = gen.generate(loaded, SAMPLE, max_words=37, seed=2)
    if rep == "cp":
        assert len(out) == 1 + 37 + 1  # opening Bar, 37 sampled words, EOS
    else:  # an unfinished last Note (pitch without velocity) is dropped
        assert 1 + 37 + 1 - 2 <= len(out) <= 1 + 37 + 1
    assert loaded.tokenizer.check(out) == 0


# ---- grammar under any settings ----------------------------------------------------------
EXTREMES = {
    "greedy": {"temperature": every(0.0)},
    "hot": {"temperature": every(100.0)},
    "tiny_top_p": {"top_p": every(1e-6)},
    "sequential_hot": {"temperature": every(100.0), "use_sequential_fields": True},
    "loop_guard_greedy": {"temperature": every(0.0), "loop_max_period": 6, "loop_max_repeats": 2},
}


@pytest.mark.parametrize("setting", EXTREMES, ids=list(EXTREMES))
@pytest.mark.parametrize("rep", ["cp", "remi"])
def test_never_crashes_and_always_decodes(tmp_path: Path, rep: str, setting: str) -> None:
    """Random models (with and without EOS, both attentions) under extreme sampling."""
    for seed in range(3):
        attention = "absolute" if seed % 2 else "relative"
        bias = no_eos(rep) if seed else None
        path = save_random(tmp_path / f"{seed}.pt", rep, seed=seed, attention=attention, bias=bias)
        loaded = gen.load_model(path)
        out = gen.generate(loaded, sample(**EXTREMES[setting]), max_words=70, seed=seed)
        kinds = out[:, TYPE] if rep == "cp" else out
        assert (kinds == EOS).sum() == 1 and kinds[-1] == EOS
        assert loaded.tokenizer.check(out) == 0, f"{setting} seed {seed}: grammar violations"
        loaded.tokenizer.decode(out)
        assert loaded.tokenizer.last_decode_errors == 0


def test_sequential_fields_keep_the_tokenizers_note_order(tmp_path: Path) -> None:
    """Sequential mode: notes of a position rise in (pitch, duration, velocity), as encode sorts."""
    bias = {**no_eos("cp"), (TYPE, NOTE): 2.0}  # mostly notes, so positions hold several
    loaded = gen.load_model(save_random(tmp_path / "m.pt", bias=bias))

    def disorder(out: np.ndarray) -> int:
        bad, last = 0, None
        for w in out:
            if w[TYPE] == NOTE:
                key = (w[PITCH], w[DURATION], w[VELOCITY])
                bad += last is not None and key < last
                last = key
            else:
                last = None
        return bad

    runs = [gen.generate(loaded, sample(use_sequential_fields=s), max_words=300) for s in (0, 1)]
    assert disorder(runs[0]) > 0 and disorder(runs[1]) == 0  # the rule is real, and kept


def test_loop_guard_breaks_greedy_cycles(ckpts: dict[str, Path]) -> None:
    """REMI greedy on a random model cycles (Pitch Duration Velocity x 5); the guard stops it."""
    loaded = gen.load_model(ckpts["remi"])
    greedy = sample(temperature=every(0.0))
    guarded = dataclasses.replace(greedy, loop_max_period=4, loop_max_repeats=3)

    def extended_loops(out: np.ndarray) -> int:  # tokens that made a 4th back-to-back copy
        return sum(
            any(
                np.array_equal(out[i - 3 * p : i + 1 - p], out[i - 2 * p : i + 1])
                for p in (1, 2, 3, 4)
                if i >= 3 * p
            )
            for i in range(len(out) - 1)
        )

    plain = gen.generate(loaded, greedy, max_words=120)
    assert extended_loops(plain) > 0  # a random greedy model cycles
    assert extended_loops(gen.generate(loaded, guarded, max_words=120)) == 0


# ---- continuing a MIDI file --------------------------------------------------------------
@pytest.mark.parametrize("rep", ["cp", "remi"])
def test_continue_midi_keeps_the_prompt_bit_exact(ckpts: dict[str, Path], rep: str) -> None:
    loaded = gen.load_model(ckpts[rep])
    prompt, full = gen.continue_midi(
        loaded, SAMPLE, example_midi_file(), 3, max_bars=6, max_words=400
    )
    encoded = loaded.tokenizer.encode(example_midi_file())
    np.testing.assert_array_equal(prompt, encoded[: len(prompt)])
    np.testing.assert_array_equal(full[: len(prompt)], prompt)
    cp_words = loaded.tokenizer._to_words
    assert bars_of(cp_words(prompt)[0]) == 3  # cut at the bar line that opens bar 3
    assert bars_of(cp_words(encoded[: len(prompt) + 2])[0]) > 3
    assert bars_of(cp_words(full)[0]) <= 6 and len(full) > len(prompt) + 1
    assert loaded.tokenizer.check(full) == 0


def test_prompt_with_eos_or_bad_ids_is_refused(ckpts: dict[str, Path]) -> None:
    loaded = gen.load_model(ckpts["cp"])
    encoded = loaded.tokenizer.encode(example_midi_file())
    with pytest.raises(ValueError, match="EOS"):
        gen.generate(loaded, SAMPLE, prompt=encoded)
    with pytest.raises(ValueError, match="outside"):
        gen.generate(loaded, SAMPLE, prompt=encoded[:5] + 1000)


# ---- sampling settings and model references ----------------------------------------------
def params_copy(tmp_path: Path, **sections) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["tune"]["out_dir"] = str(tmp_path / "tune")
    data["generate"]["out_dir"] = str(tmp_path / "out")
    for name, values in sections.items():
        data[name] |= values
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_tuned_sampling_overlays_the_sample_section(tmp_path: Path) -> None:
    """`musegen generate` composes with choice.sampling: params.yaml's sample section overlaid
    by tune's best_sampling.yaml."""
    from musegen.stages import choice

    params = params_copy(tmp_path)
    assert choice.sampling(choice.GenerateConfig.load(params)) == SAMPLE  # nothing tuned yet
    (tmp_path / "tune").mkdir()
    tuned = tmp_path / "tune/best_sampling.yaml"
    tuned.write_text("temperature: {pitch: 0.7}\ntop_p: {duration: 0.8}\n")
    got = choice.sampling(choice.GenerateConfig.load(params))
    assert got.temperature["pitch"] == 0.7 and got.top_p["duration"] == 0.8
    assert got.temperature["type"] == SAMPLE.temperature["type"]
    assert got.with_overrides(["pitch=1.3"]).temperature["pitch"] == 1.3  # flags win
    tuned.write_text("temprature: {pitch: 0.7}\n")
    with pytest.raises(ParamsError, match=r"best_sampling\.yaml: unknown key 'temprature'"):
        choice.sampling(choice.GenerateConfig.load(params))


@pytest.mark.slow
def test_models_uri_resolves_to_the_registered_checkpoint(
    tmp_path: Path, ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real registry in a tmp sqlite store: register, then generate from models:/...@alias."""
    from musegen.stages import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "step_5.pt").write_bytes(ckpts["cp"].read_bytes())
    params = register.RegisterParams(
        name="musegen-test", alias="champion", report=str(tmp_path / "r.json")
    )
    tuned = SAMPLE.with_overrides(["pitch=0.7"])
    with pytest.warns(UserWarning, match="training run"):
        limits = register.limits_for(register.RegisterConfig.load(ROOT / "params.yaml"))
        register.register(
            params, ckpt_dir / "step_5.pt", tuned, limits=limits, experiment="gen-test"
        )
    path = gen.resolve_checkpoint("models:/musegen-test@champion", tmp_path / "dl")
    assert gen.bundled_sampling(path) == tuned  # the version's own sampling travels with it
    assert gen.bundled_sampling(ckpts["cp"]) is None  # a bare checkpoint has none
    a = gen.load_model(path)
    b = gen.load_model(ckpts["cp"])
    for key, value in b.model.state_dict().items():
        torch.testing.assert_close(a.model.state_dict()[key], value, rtol=0, atol=0)
    np.testing.assert_array_equal(
        gen.generate(a, SAMPLE, max_words=30), gen.generate(b, SAMPLE, max_words=30)
    )


# ---- the CLI -----------------------------------------------------------------------------
def test_cli_writes_midi_mp3_and_roll(
    tmp_path: Path, ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from musegen.apps.cli import app

    monkeypatch.setenv("MUSEGEN_RENDERER", "numpy")
    params = params_copy(tmp_path)
    out = tmp_path / "samples"
    args = ["generate", "--checkpoint", str(ckpts["cp"]), "--params", str(params), "--n", "2"]
    args += ["--bars", "4", "--seed", "11", "--out", str(out), "--mp3", "--roll"]
    args += ["--temperature", "pitch=0", "--top-p", "duration=0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "generate.json").read_text())
    assert [p["seed"] for p in meta["pieces"]] == [11, 12]
    assert meta["sample"]["temperature"]["pitch"] == 0.0 and meta["step"] == 5
    for seed in (11, 12):
        midi = miditoolkit.MidiFile(out / f"sample_seed{seed}.mid")
        assert midi.instruments[0].notes and midi.max_tick <= 4 * 1920 + 3840
        assert (out / f"sample_seed{seed}.mp3").stat().st_size > 1000
        assert (out / f"sample_seed{seed}.png").read_bytes()[:4] == b"\x89PNG"
    # continuing a file; an unknown field in an override is one readable error
    prompt = ["--prompt", str(example_midi_file()), "--prompt-bars", "2", "--n", "1"]
    result = CliRunner().invoke(app, [*args[:5], *prompt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / f"{Path(example_midi_file()).stem}_seed0.mid").is_file()
    result = CliRunner().invoke(app, [*args[:5], "--temperature", "pich=1"])
    assert result.exit_code == 1 and "unknown field 'pich'" in result.output
