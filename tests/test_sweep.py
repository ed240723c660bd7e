"""The checkpoint sweep: checkpoint choice, the page (in headless Chromium), blind mode, MLflow.

Checkpoints are tiny randomly initialised CP models saved in train.py's format, with a real
parent training run in a temporary MLflow sqlite store. Prompts and reference come from the
real valid split (conftest's prepared corpus); the test split is never read.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from musegen.config import load_section
from musegen.core.model import ModelConfig, MusicTransformer
from musegen.core.sampling import SampleParams
from musegen.stages import sweep as stage
from musegen.stages import sweep_page
from musegen.stages.evaluate import EvaluateParams
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
    from musegen.core.tokenizer import get_tokenizer
    from musegen.stages.tokenize import TokenizeParams

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
    valid_songs = set(manifest.path[manifest.split == "valid"])
    assert len(saved["prompts"]) == 2 and set(saved["prompts"]) <= valid_songs
    # the reference: the other valid songs, never a prompt's own (the real anchor's) song
    assert saved["reference_pieces"] and set(saved["reference_pieces"]) <= valid_songs
    assert set(saved["reference_pieces"]).isdisjoint(saved["prompts"])
    assert saved["num_reference"] == len(saved["reference_pieces"]) and saved["split"] == "valid"
    hashes = [h for col in saved["columns"].values() for h in col["clips"]]
    assert len(hashes) == 2 * 4 and len(set(hashes)) == len(hashes)  # one id per cell
    for key, step in (("step_1", 1), ("step_3", 3)):
        # valid loss from the checkpoint's history at that STEP (make_checkpoint: 10 - s/10)
        assert saved["columns"][key]["valid_loss"] == pytest.approx(10 - step / 10)
    scores = {k: v["sweep_score"] for k, v in saved["columns"].items() if k != "real"}
    assert saved["best_step"] == int(max(scores, key=scores.get)[5:])


def test_real_anchor_is_scored_without_its_own_songs(open_sweep: dict, store: dict) -> None:
    """The real column's score uses the other valid songs only; with its own songs in the
    reference (the leak this avoids) the same clips would score higher."""
    from musegen.core.tokenizer import get_tokenizer
    from musegen.stages.tokenize import TokenizeParams

    tp = load_section(TokenizeParams, "tokenize", PARAMS)
    tok = get_tokenizer("cp", use_chords=tp.use_chords, num_rest_bars=tp.num_rest_bars)
    corpus = store["corpus"]
    songs = stage.pick_prompts(corpus["manifest"], corpus["raw_dir"], tok, sweep_params(Path()))
    shown = [s["real"] for s in songs if s["shown"]]
    others = [s["real"] for s in songs if not s["shown"]]
    ev = load_section(EvaluateParams, "evaluate", PARAMS)
    fair = stage.set_score(shown, others, ev)["sweep_score"]
    assert open_sweep["result"]["columns"]["real"]["sweep_score"] == pytest.approx(fair)
    assert stage.set_score(shown, others + shown, ev)["sweep_score"] > fair


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
        re.fullmatch(r"piano roll, prompt \d, clip [1-3]", a) for a in alts
    )
    # no metric in the page (reveal.js holds them); its own ratings key
    assert "title=" not in page and "notes_per_bar" not in page and "sweep score" not in page
    assert "'musegen-sweep-blind/'" in page and "'musegen-sweep/'" not in page
    reveal = json.loads(re.search(r"=\s*(\{.*\});", (out / "reveal.js").read_text(), re.S)[1])
    cells = reveal["cells"]
    assert sorted({str(v["step"]) for v in cells.values()}) == ["1", "3", "None"]
    assert all("notes_per_bar" in v["metrics"] for v in cells.values())
    # every row shuffled on its own: the rows' column orders are not all the same
    rows = [re.findall(r'class="rate" data-clip="(\w+)"', r) for r in page.split("<tr>")[2:]]
    order = [[cells[c]["label"] for c in row] for row in rows]
    assert len(order) == 2 and order[0] != order[1], order
    assert order == [
        [["real", "STEP 1", "STEP 3"][i] for i in row] for row in sweep_page.row_orders(2, 3, 0)
    ]


@pytest.mark.parametrize(("n_cols", "seed"), [(2, 0), (3, 0), (4, 1), (5, 7)])
def test_row_orders_shuffle_every_row(n_cols: int, seed: int) -> None:
    """The true order the old whole-page permutation gave (seed 1, 4 columns) is gone: the
    first row is never it, no row repeats the one above, every column leads somewhere."""
    orders = sweep_page.row_orders(30, n_cols, seed)
    assert orders[0] != list(range(n_cols))
    assert all(a != b for a, b in itertools.pairwise(orders))
    assert all(sorted(o) == list(range(n_cols)) for o in orders)
    assert {o[0] for o in orders} == set(range(n_cols))


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
    imgs = cells + (mode == "open_sweep")  # and the validation curves (blind: on reveal only)
    assert check == {"audio": cells, "audio_ok": cells, "img": imgs, "img_ok": imgs}


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: apt-get install chromium")
def test_chromium_rates_on_the_blind_page_and_the_export_merges(
    blind_sweep: dict, tmp_path: Path
) -> None:
    """A rater clicks a score in every cell of the blind page (?ratetest) and "best of this
    row" in every row (first one clip, then another) and exports; the export merges into the
    ratings table with each clip's STEP, found from its hash, and each row's choices."""
    from musegen.core import ratings

    out = blind_sweep["out"]
    dom = _chromium((out / "index.html").as_uri() + "?ratetest", tmp_path / "profile")
    found = re.search(r'<pre id="selftest"[^>]*>([^<]*)</pre>', dom)
    assert found and found[1], dom[-500:]
    export = json.loads(found[1].replace("&quot;", '"'))
    assert export["format"] == ratings.FORMAT and export["blind"] and export["rater"] == "chromium"
    page = (out / "index.html").read_text()
    clicked = re.findall(r'class="rate" data-clip="(\w+)"', page)
    assert [r["clip"] for r in export["ratings"]] == clicked
    assert [r["score"] for r in export["ratings"]] == [i % 5 + 1 for i in range(len(clicked))]
    # the last clip of each row was picked (after the first): it beats the row's other two
    rows = [clicked[:3], clicked[3:]]
    pairs = [(c["winner"], c["loser"], c["prompt"]) for c in export["choices"]]
    assert pairs == [(row[-1], other, r) for r, row in enumerate(rows) for other in row[:-1]]
    path = tmp_path / "ratings.json"
    path.write_text(json.dumps(export))
    counts = ratings.add([path], tmp_path / "ratings", out / "metrics.json")
    assert counts == {"added": 10, "duplicates": 0, "total": 10}
    table = ratings.read_table(tmp_path / "ratings")
    sweep = json.loads((out / "metrics.json").read_text())
    for row in table.itertuples():
        col = sweep["columns"][row.column]
        assert row.clip in col["clips"] and str(row.step) == str(col.get("step", ""))
        if row.beats:
            assert row.beats in sweep["columns"][row.beats_column]["clips"]
    assert ratings.count_pairs(table, sweep) == 4
