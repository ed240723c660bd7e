"""The checkpoint sweep: checkpoint choice, the page (in headless Chromium), blind mode, MLflow.

Checkpoints are tiny randomly initialised CP models saved in train.py's format, with a real
parent training run in a temporary MLflow sqlite store. Prompts come from the real test split
(data/prepared/manifest.csv, read only).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from musegen import sweep as stage
from musegen.config import load_section
from musegen.evaluate import EvaluateParams
from musegen.model import ModelConfig, MusicTransformer
from musegen.sampling import SampleParams
from tests.conftest import needs

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def cp_vocab() -> dict:
    """The CP vocab the tokenize stage writes with this params.yaml (it depends on config only)."""
    from musegen.tokenize import TokenizeParams
    from musegen.tokenizer import get_tokenizer

    p = load_section(TokenizeParams, "tokenize", PARAMS)
    return get_tokenizer("cp", use_chords=p.use_chords, num_rest_bars=p.num_rest_bars).vocab


def make_checkpoint(path: Path, step: int, seed: int, run_id: str | None) -> Path:
    """A random tiny CP model in train.py's checkpoint format (EOS made unlikely)."""
    vocab = cp_vocab()
    n = len(vocab["fields"])
    config = ModelConfig(
        vocab_sizes=vocab["sizes"],
        emb_sizes=[8] * n,
        d_model=32,
        n_layer=1,
        n_head=2,
        d_ff=64,
        dropout=0.0,
        max_len=512,
        attention="relative",
    )
    torch.manual_seed(seed)
    model = MusicTransformer(config)
    with torch.no_grad():  # priors like train's unigram init, else random pieces end at once
        for head in model.heads:  # model init zeroes the heads: every seed would agree
            head.weight.normal_(0.0, 0.5)
        model.heads[0].bias[1] = -20.0  # type id 1 = EOS
        model.heads[-1].bias[0] = 20.0  # rest id 0 = no empty bars (a random Rest_k ends it)
    history = [{"step": s, "valid_loss": 10.0 - s / 10} for s in range(1, step + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "step": step,
            "model": model.state_dict(),
            "model_config": dataclasses.asdict(config),
            "vocab": vocab,
            "mlflow_run_id": run_id,
            "params_hash": f"h{seed}",
            "history": history,
            "best": history[-1],
        },
        path,
    )
    return path


def sweep_params(tmp: Path, **changes: object) -> stage.SweepParams:
    base = load_section(stage.SweepParams, "sweep", PARAMS)
    small = {
        "num_prompts": 2,
        "prompt_bars": 2,
        "continue_bars": 2,
        "max_words": 120,
        "renderer": "auto",
        "out_dir": str(tmp),
        "metrics_file": str(tmp / "metrics.json"),
    }
    return dataclasses.replace(base, **(small | changes))


@pytest.fixture(scope="module")
def store(training_run: dict, prepared_corpus: dict) -> dict:
    """The training run's store with three checkpoints pointing at it.

    step_2 holds the same weights as step_1 (seed 1 both): same prompts + same seeds must
    then give the same music in both columns.
    """
    ckpts = training_run["tmp"] / "models/checkpoints"
    for step, seed in ((1, 1), (2, 1), (3, 7)):
        make_checkpoint(ckpts / f"step_{step}.pt", step, seed, training_run["run_id"])
    return training_run | {"ckpts": ckpts, "corpus": prepared_corpus}


def run_sweep(store: dict, out: Path, **changes: object) -> dict:
    sample = load_section(SampleParams, "sample", PARAMS)
    return stage.sweep(
        sweep_params(out, **changes),
        store["ckpts"],
        store["corpus"]["manifest"],
        store["corpus"]["raw_dir"],
        sample=sample,
        eval_params=load_section(EvaluateParams, "evaluate", PARAMS),
        progress=False,
    )


@pytest.fixture(scope="module")
def open_sweep(store: dict) -> dict:
    out = store["tmp"] / "open"
    return {"out": out, "result": run_sweep(store, out)}


@pytest.fixture(scope="module")
def blind_sweep(store: dict) -> dict:
    out = store["tmp"] / "blind"
    return {"out": out, "result": run_sweep(store, out, use_blind=True, steps=(1, 3))}


def test_choose_checkpoints_all_every_k_and_list(tmp_path: Path) -> None:
    for s in (100, 200, 300, 400, 500):
        (tmp_path / f"step_{s}.pt").touch()
    (tmp_path / "best.pt").touch()  # never swept: it repeats a STEP
    steps = lambda paths: [int(p.stem[5:]) for p in paths]  # noqa: E731
    assert steps(stage.choose_checkpoints(tmp_path, "all", 1)) == [100, 200, 300, 400, 500]
    assert steps(stage.choose_checkpoints(tmp_path, "all", 2)) == [100, 300, 500]
    assert steps(stage.choose_checkpoints(tmp_path, "all", 3)) == [200, 500]  # last kept
    assert steps(stage.choose_checkpoints(tmp_path, (300, 100), 1)) == [100, 300]
    with pytest.raises(FileNotFoundError, match=r"sweep.steps \[250\].*found \[100, 200"):
        stage.choose_checkpoints(tmp_path, (250,), 1)
    with pytest.raises(FileNotFoundError, match=r"run `musegen train`"):
        stage.choose_checkpoints(tmp_path / "none", "all", 1)


def test_params_reject_bad_steps() -> None:
    from musegen.config import ParamsError

    with pytest.raises(ParamsError, match=r"sweep\.steps"):
        dataclasses.replace(load_section(stage.SweepParams, "sweep", PARAMS), steps="some")


def test_metrics_json_columns_scores_and_prompts(open_sweep: dict, store: dict) -> None:
    import pandas as pd

    result = open_sweep["result"]
    saved = json.loads(Path(result["page"]).with_name("metrics.json").read_text())
    assert saved["columns"] == result["columns"]
    assert list(saved["columns"]) == ["real", "step_1", "step_2", "step_3"]
    manifest = pd.read_csv(store["corpus"]["manifest"], keep_default_na=False)
    test_songs = set(manifest.path[manifest.split == "test"])
    assert len(saved["prompts"]) == 2 and set(saved["prompts"]) <= test_songs
    for key, step in (("step_1", 1), ("step_3", 3)):
        # valid loss from the checkpoint's history at that STEP (make_checkpoint: 10 - s/10)
        assert saved["columns"][key]["valid_loss"] == pytest.approx(10 - step / 10)
    scores = {k: v["sweep_score"] for k, v in saved["columns"].items() if k != "real"}
    assert saved["best_step"] == int(max(scores, key=scores.get)[5:])
    # the real anchor scores like the real reference; random models do not
    assert saved["columns"]["real"]["sweep_score"] > max(scores.values())


def test_same_weights_same_seed_same_music(open_sweep: dict) -> None:
    """step_1 and step_2 hold the same weights: every row's MIDI is byte-identical."""
    assets = open_sweep["out"] / "assets"
    for row in range(2):
        one = (assets / f"p{row}_step_1.mid").read_bytes()
        assert one == (assets / f"p{row}_step_2.mid").read_bytes()
        assert one != (assets / f"p{row}_step_3.mid").read_bytes()


def test_page_links_are_relative_and_complete(open_sweep: dict) -> None:
    page = (open_sweep["out"] / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(links) == 2 * 4 * 3 + 1  # rows x columns x (mp3, png, mid) + curves.png
    for link in links:
        assert not re.match(r"^(/|[a-z]+:)", link), link  # no absolute path, no URL
        assert (open_sweep["out"] / link).is_file(), link
    assert page.count('<audio controls preload="none"') == 8
    assert "STEP 3" in page and "valid loss 9.700" in page


def test_mlflow_child_runs_per_checkpoint(store: dict, open_sweep: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [store["experiment"]], f"tags.mlflow.parentRunId = '{store['run_id']}'"
    )
    runs = [r for r in runs if r.data.tags.get("musegen.stage") == "sweep"]
    by_step = {int(r.data.params["step"]): r for r in runs}
    assert set(by_step) >= {1, 2, 3}
    cols = open_sweep["result"]["columns"]
    for step, run in by_step.items():
        assert run.data.metrics["sweep_score"] == pytest.approx(cols[f"step_{step}"]["sweep_score"])
        names = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "sweep")}
        assert {f"p0_step_{step}.mp3", f"p1_step_{step}.mid"} <= names


def test_curves_image_marks_steps_and_is_logged(store: dict, open_sweep: dict) -> None:
    """curves.png beside the page, linked from it, logged to the training run; the best
    valid loss of make_checkpoint's history (10 - s/10) is at the last STEP."""
    import matplotlib.image as mpimg

    import mlflow

    result = open_sweep["result"]
    assert result["best_valid_step"] == 3 and Path(result["curves"]).is_file()
    assert mpimg.imread(result["curves"]).shape[:2] == (560, 800)
    assert 'src="curves.png"' in (open_sweep["out"] / "index.html").read_text()
    logged = mlflow.MlflowClient().list_artifacts(store["run_id"], "sweep")
    assert "sweep/curves.png" in {a.path for a in logged}


def test_blind_page_hides_steps(blind_sweep: dict) -> None:
    out = blind_sweep["out"]
    page = (out / "index.html").read_text()
    names = [p.name for p in (out / "assets").iterdir()]
    assert len(names) == 2 * 3 * 3
    for text in [page, *names]:  # no STEP label, column key, valid loss or "real" column
        assert not re.search(r"step[ _]?\d|valid loss|>real<|_real", text, re.I), text[:200]
    assert not re.search(r"step|real", " ".join(names), re.I)
    alts = re.findall(r'alt="([^"]+)"', page.replace('alt="validation curves by STEP"', ""))
    assert len(alts) == 6 and all(
        re.fullmatch(r"piano roll, prompt \d, Sample [A-C]", a) for a in alts
    )
    assert "<title>" in page and "title=" not in page.replace('title="z = ', "")
    reveal = json.loads(re.search(r"=\s*(\{.*\});", (out / "reveal.js").read_text(), re.S)[1])
    assert sorted(reveal) == ["Sample A", "Sample B", "Sample C"]
    assert sorted(str(v["step"]) for v in reveal.values()) == ["1", "3", "None"]


def _chromium(url: str, tmp: Path) -> str:
    """Chromium's DOM of `url` after up to 10 s of virtual time (players load metadata)."""
    proc = subprocess.run(
        [
            CHROMIUM,
            *CHROME_FLAGS,
            f"--user-data-dir={tmp}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    return proc.stdout


@needs("chromium", "chromium-browser", install="apt-get install chromium")
@pytest.mark.parametrize("mode", ["open_sweep", "blind_sweep"])
def test_chromium_loads_every_player_and_roll(
    mode: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    out = request.getfixturevalue(mode)["out"]
    cells = 2 * (4 if mode == "open_sweep" else 3)
    # media decode runs in real time, not Chromium's virtual time: on a loaded machine the
    # budget can end first, so a short-loaded page gets two more tries before it fails
    for attempt in range(3):
        dom = _chromium((out / "index.html").as_uri() + "?selftest", tmp_path / f"p{attempt}")
        found = re.search(r'<pre id="selftest"[^>]*>([^<]*)</pre>', dom)
        assert found and found[1], dom[-500:]
        check = json.loads(found[1])
        if check["audio_ok"] == cells:
            break
    imgs = cells + 1  # and the validation curves
    assert check == {"audio": cells, "audio_ok": cells, "img": imgs, "img_ok": imgs}
