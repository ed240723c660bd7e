"""The strict params loader: every key known, every key present, errors name key and file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from musegen.config import DataParams, ParamsError, flatten, load_section

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Demo:
    a: int
    b: tuple[int, ...]
    c: dict[str, float]


def write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_and_freezes_lists(tmp_path: Path) -> None:
    p = write(tmp_path, "demo:\n  a: 1\n  b: [1, 2]\n  c: {pitch: 1.5}\n")
    demo = load_section(Demo, "demo", p)
    assert demo == Demo(a=1, b=(1, 2), c={"pitch": 1.5})


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    p = write(tmp_path, "demo:\n  a: 1\n  b: []\n  c: {}\n  typo: 3\n")
    with pytest.raises(ParamsError, match=rf"{p}: unknown key demo\.typo"):
        load_section(Demo, "demo", p)


def test_missing_key_and_section(tmp_path: Path) -> None:
    p = write(tmp_path, "demo:\n  a: 1\n  c: {}\n")
    with pytest.raises(ParamsError, match=r"missing key demo\.b"):
        load_section(Demo, "demo", p)
    with pytest.raises(ParamsError, match=r"missing section 'other'"):
        load_section(Demo, "other", p)
    with pytest.raises(ParamsError, match="params file not found"):
        load_section(Demo, "demo", tmp_path / "nope.yaml")


def test_override_file_replaces_values_and_rejects_unknown(tmp_path: Path) -> None:
    p = write(tmp_path, "demo:\n  a: 1\n  b: [1]\n  c: {pitch: 1.0, velocity: 2.0}\n")
    o = write(tmp_path, "demo:\n  a: 5\n  c: {pitch: 9.0}\n", "gpu.yaml")
    demo = load_section(Demo, "demo", p, overrides=(o,))
    assert demo == Demo(a=5, b=(1,), c={"pitch": 9.0, "velocity": 2.0})
    bad = write(tmp_path, "demo:\n  d: 1\n", "bad.yaml")
    with pytest.raises(ParamsError, match=rf"{bad}.demo: unknown key 'd'"):
        load_section(Demo, "demo", p, overrides=(bad,))


def test_repository_params_load() -> None:
    data = load_section(DataParams, "data", ROOT / "params.yaml")
    assert data.raw_dir == Path(data.raw_root) / data.corpus
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


@pytest.mark.parametrize(
    "profile", ["params-gpu.yaml", "params-cpu-long.yaml", "params-cp-vs-remi.yaml"]
)
def test_override_profiles_load(profile: str) -> None:
    """The README's override profiles only set known keys; the long CPU profile keeps >= 6
    STEP checkpoints for the sweep."""
    from musegen.core.model import ModelParams
    from musegen.stages.sweep import SweepParams
    from musegen.stages.train import TrainParams

    over = (ROOT / profile,)
    train = load_section(TrainParams, "train", ROOT / "params.yaml", over)
    load_section(ModelParams, "model", ROOT / "params.yaml", over)
    if profile == "params-cpu-long.yaml":
        assert train.max_steps // train.save_every >= 6 and train.keep_last == 0
        # the default profile trains with augmentation; the long one turns it off to overfit
        assert load_section(TrainParams, "train", ROOT / "params.yaml").transpose_range > 0
        load_section(SweepParams, "sweep", ROOT / "params.yaml", over)
