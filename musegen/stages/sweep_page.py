"""The sweep's listening page: index.html (open or blind) from the sweep's clips and numbers.

The open page shows each column under its STEP with its metrics; the blind page (for raters)
shuffles every row on its own, names cells "clip k" and files by hash, keeps every STEP, loss
and metric in reveal.js until "reveal", and has the rating form and its JSON export
(`musegen ratings add` reads it). The page works opened from disk: relative links, inline CSS
and JS. `musegen.stages.sweep` makes the clips and calls `write_page`.
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from musegen import paths

if TYPE_CHECKING:
    from musegen.stages.sweep import SweepParams

#: metrics shown in each cell (all of them go to metrics.json and MLflow).
KEY_METRICS = (
    "notes_per_bar",
    "polyphony",
    "pitch_class_entropy",
    "scale_consistency",
    "gs",
    "dup_bar_rate",
)


CSS = """
body{font:14px system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:6px;vertical-align:top}
th{background:#f4f4f4;text-align:left;font-weight:normal}th b{font-size:15px}
img{display:block;width:360px}audio{width:360px}.m{font:12px monospace;margin-top:4px}
img.curves{width:800px;margin:8px 0}
.m span{display:inline-block;margin-right:8px}.z1{background:#fde6b0}.z2{background:#f7a8a8}
.rate button{min-width:2em}.rate button.on,.best button.on{background:#2a6;color:#fff}
.who b{color:#a30}
"""

#: the blind page's script: scores and each row's best clip in this page's own localStorage
#: keys, export (ratings.FORMAT: the best clip of a row beats every other clip of that row),
#: reveal
BLIND_JS = """
const PAGE = document.body.dataset.page, KEY = 'musegen-sweep-blind/' + PAGE + '/';
const rater = document.getElementById('rater');
rater.value = localStorage.getItem(KEY + 'rater') || '';
rater.oninput = () => localStorage.setItem(KEY + 'rater', rater.value.trim());
function stored(clip){ try { return JSON.parse(localStorage.getItem(KEY + clip)); }
  catch (e) { return null; } }
function paint(div){ const v = stored(div.dataset.clip);
  div.querySelectorAll('button').forEach(b =>
    b.classList.toggle('on', v !== null && b.textContent === String(v.score))); }
document.querySelectorAll('.rate').forEach(div => {
  div.querySelectorAll('button').forEach(b => b.onclick = () => {
    localStorage.setItem(KEY + div.dataset.clip,
      JSON.stringify({score: Number(b.textContent), time: new Date().toISOString()}));
    paint(div); });
  paint(div); });
function best(row){ try { return JSON.parse(localStorage.getItem(KEY + 'best/' + row)); }
  catch (e) { return null; } }
function paintBest(){ document.querySelectorAll('.best').forEach(div => {
  const v = best(div.dataset.prompt), b = div.querySelector('button');
  b.classList.toggle('on', v !== null && v.clip === div.dataset.clip); }); }
document.querySelectorAll('.best').forEach(div => {
  div.querySelector('button').onclick = () => {
    localStorage.setItem(KEY + 'best/' + div.dataset.prompt,
      JSON.stringify({clip: div.dataset.clip, time: new Date().toISOString()}));
    paintBest(); }; });
paintBest();
function exportRatings(){
  const ratings = [];
  document.querySelectorAll('.rate').forEach(div => { const v = stored(div.dataset.clip);
    if (v) ratings.push({clip: div.dataset.clip, prompt: Number(div.dataset.prompt),
                         score: v.score, time: v.time}); });
  const choices = [], rows = {};
  document.querySelectorAll('.best').forEach(div =>
    (rows[div.dataset.prompt] = rows[div.dataset.prompt] || []).push(div.dataset.clip));
  Object.entries(rows).forEach(([row, clips]) => { const v = best(row);
    if (v && clips.includes(v.clip)) clips.filter(c => c !== v.clip).forEach(c =>
      choices.push({winner: v.clip, loser: c, prompt: Number(row), time: v.time})); });
  return {format: 'musegen-sweep-ratings/2', page: PAGE, blind: true,
          rater: rater.value.trim(), ratings, choices}; }
document.getElementById('export').onclick = () => {
  const data = exportRatings();
  if (!data.rater) { alert('type your name in "rater" first'); rater.focus(); return; }
  const blob = new Blob([JSON.stringify(data, null, 1)], {type: 'application/json'});
  const a = document.createElement('a'); a.href = URL.createObjectURL(blob);
  a.download = 'ratings-' + PAGE + '-' + data.rater.replace(/\\W+/g, '_') + '.json'; a.click(); };
function reveal(){
  document.querySelectorAll('.who').forEach(w => { const c = window.REVEAL.cells[w.dataset.clip];
    w.innerHTML = '<b>' + c.label + '</b>' + c.metrics; });
  document.getElementById('summary').innerHTML = window.REVEAL.summary; }
document.getElementById('reveal').onclick = () => { if (window.REVEAL) return reveal();
  const s = document.createElement('script'); s.src = 'reveal.js'; s.onload = reveal;
  document.head.appendChild(s); };
// ?ratetest: a rater clicks a score in every cell (cell i gets i % 5 + 1) and "best of the
// row" on the first clip of every row, then (changing their mind) on the row's last; the
// export lands in #selftest (tests/test_sweep.py feeds it to `musegen ratings add`)
window.addEventListener('load', () => {
  if (!new URLSearchParams(location.search).has('ratetest')) return;
  rater.value = 'chromium'; rater.oninput();
  document.querySelectorAll('.rate').forEach((div, i) =>
    div.querySelectorAll('button')[i % 5].click());
  document.querySelectorAll('tr').forEach(tr => { const b = tr.querySelectorAll('.best button');
    if (b.length) { b[0].click(); b[b.length - 1].click(); } });
  document.getElementById('selftest').textContent = JSON.stringify(exportRatings()); });
"""

#: both pages: ?selftest loads every player's metadata and reports what loaded (tests)
SELFTEST_JS = """
window.addEventListener('load', () => {
  if (!new URLSearchParams(location.search).has('selftest')) return;
  const out = document.getElementById('selftest'), audios = [...document.querySelectorAll('audio')];
  const imgs = [...document.querySelectorAll('img')];
  const report = () => { out.textContent = JSON.stringify({
    audio: audios.length, audio_ok: audios.filter(a => a.dataset.ok === '1').length,
    img: imgs.length, img_ok: imgs.filter(i => i.complete && i.naturalWidth > 0).length}); };
  audios.forEach(a => { a.addEventListener('loadedmetadata', () => {
    a.dataset.ok = a.duration > 0 ? '1' : '0'; report();}); a.preload = 'metadata'; a.load(); });
  report();});
"""


def _metrics_html(c: dict, ref: dict) -> str:
    """A cell's key metrics, coloured by z-score against the reference's real continuations."""
    zs = []
    for k in KEY_METRICS:
        v, m, sd = c["metrics"][k], ref[k]["mean"], ref[k]["sd"]
        z = (v - m) / sd if sd > 1e-9 else (0.0 if abs(v - m) < 1e-9 else np.sign(v - m) * 9)
        cls = "z2" if abs(z) > 2 else "z1" if abs(z) > 1 else ""
        zs.append(f'<span class="{cls}" title="z = {z:+.1f} vs real">{k} {v:.2f}</span>')
    return f'<div class="m">{"".join(zs)}</div>'


def _player(c: dict, alt: str) -> str:
    return (
        f'<audio controls preload="none" src="assets/{c["stem"]}.mp3"></audio>'
        f'<img src="assets/{c["stem"]}.png" alt="{html.escape(alt)}">'
        f'<a href="assets/{c["stem"]}.mid" download>MIDI</a> · {c["seconds"]:.0f} s'
        + ("" if c.get("complete", True) else " · <b>incomplete</b> (word cap; not scored)")
    )


def _header(col: dict) -> str:
    """Column header: STEP (or real), valid loss, sweep score, mean +/- sd of key metrics."""
    lines = [f"<b>{html.escape(col['label'])}</b>"]
    if col.get("valid_loss") is not None:
        lines.append(f"valid loss {col['valid_loss']:.3f}")
    lines.append(f"sweep score {col['sweep_score']:.3f} (OA {col['mean_oa']:.3f})")
    lines += [
        f"{k} {col['stats'][k]['mean']:.2f} ± {col['stats'][k]['sd']:.2f}" for k in KEY_METRICS
    ]
    return "<br>".join(lines)


def row_orders(n_rows: int, n_cols: int, seed: int) -> list[list[int]]:
    """The blind page's column order of each row: a seeded shuffle per row, redrawn while it
    equals the row above (or, for the first row, the true order), so no two neighbouring rows
    line up and the page never shows the columns as they are."""
    rng = np.random.default_rng(seed)
    orders: list[list[int]] = []
    for _ in range(n_rows):
        previous = orders[-1] if orders else list(range(n_cols))
        order = previous
        while order == previous and n_cols > 1:
            order = [int(i) for i in rng.permutation(n_cols)]
        orders.append(order)
    return orders


def write_page(
    out: Path, columns: list[dict], shown: list[dict], ref: dict, params: SweepParams
) -> Path:
    """Write index.html (and reveal.js in blind mode); every link is relative to `out`.

    The open page shows each column under its STEP with its metrics. The blind page (for
    raters) shuffles every row on its own, names cells "clip k" and files by hash, keeps
    every STEP, loss and metric out of the page (reveal.js holds them), and has the rating
    form and its JSON export (`musegen ratings add` reads it).

    Args:
        out: the page folder (assets/ already filled).
        columns: real anchor first, then one per STEP, each with its cells and stats.
        shown: the prompt songs (rows).
        ref: {metric: {mean, sd}} of the reference's real continuations (z-scores).
        params: the `sweep` section.
    """
    e = html.escape
    page_id = hashlib.sha256(
        json.dumps([params.seed, [c["key"] for c in columns], [s["path"] for s in shown]]).encode()
    ).hexdigest()[:10]
    blind = params.use_blind
    rows = []
    # the curves name the STEPs: on a blind page only in the reveal (like the metrics)
    curves = '<img class="curves" src="curves.png" alt="validation curves by STEP">'
    if blind:
        heads = "".join(f"<th>clip {k + 1}</th>" for k in range(len(columns)))
        orders = row_orders(len(shown), len(columns), params.seed)
        rate = "".join(f"<button>{i}</button>" for i in range(1, 6))
        for r, order in enumerate(orders):
            cells = "".join(
                f"<td>{_player(c, f'piano roll, prompt {r + 1}, clip {k + 1}')}"
                f'<div class="who" data-clip="{c["stem"]}"></div>'
                f'<div class="rate" data-clip="{c["stem"]}" data-prompt="{r}">rating {rate}'
                f'</div><div class="best" data-clip="{c["stem"]}" data-prompt="{r}">'
                "<button>best of this row</button></div></td>"
                for k, c in enumerate(columns[i]["cells"][r] for i in order)
            )
            rows.append(f"<tr><th>prompt {r + 1}</th>{cells}</tr>")
        cells_map = {
            c["stem"]: {
                "label": col["label"],
                "step": col["step"],
                "metrics": _metrics_html(c, ref),
            }
            for col in columns
            for c in col["cells"]
        }
        summary = curves + "<table><tr>" + "".join(f"<th>{_header(c)}</th>" for c in columns)
        summary += "</tr></table>"
        reveal = {"cells": cells_map, "summary": summary}
        (out / "reveal.js").write_text(f"window.REVEAL = {json.dumps(reveal, indent=1)};\n")
    else:
        heads = "".join(f"<th>{_header(c)}</th>" for c in columns)
        for r, song in enumerate(shown):
            cells = "".join(
                f"<td>{_player(c['cells'][r], f'piano roll, prompt {r + 1}, ' + c['label'])}"
                f"{_metrics_html(c['cells'][r], ref)}</td>"
                for c in columns
            )
            rows.append(
                f"<tr><th>prompt {r + 1}<br>{e(song['path'])}<br>seed "
                f"{params.seed + r}</th>{cells}</tr>"
            )
    title = "musegen sweep (blind)" if blind else "musegen checkpoint sweep"
    clips = (
        f"Each clip: {params.prompt_bars} prompt bars of a valid-split song, then "
        f"{params.continue_bars} bars of continuation (same seed per row)."
    )
    clips += f" A red line in each piano roll marks where the {params.prompt_bars}-bar prompt ends."
    if blind:
        intro = (
            f"{clips} One clip per row is the real song; the others are checkpoints, in a "
            "different order on every row. Rate each clip 1-5, or pick the best of each row "
            "(it beats the row's other clips), or both; type your name, export, then "
            "<code>musegen ratings add ratings-….json</code>. Reveal shows what each clip was."
        )
        controls = (
            '<label>rater <input id="rater" size="16"></label> '
            '<button id="export">export ratings (JSON)</button> '
            '<button id="reveal">reveal</button>'
        )
        script = BLIND_JS + SELFTEST_JS
    else:
        intro = (
            f"{clips} Metrics measure the continuation; colour = |z| &gt; 1 / &gt; 2 against "
            f"the real continuations of {ref['n_bars']['n']} other valid songs. To rate "
            "without seeing STEPs: <code>musegen sweep --blind</code>."
        ) + curves
        controls, script = "", SELFTEST_JS
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head>"
        f'<body class="{"blind" if blind else ""}" data-page="{page_id}">'
        f"<h1>{title}</h1><p>{intro}</p><p>{controls}</p>"
        f"<table><tr><th>prompt</th>{heads}</tr>{''.join(rows)}</table>"
        f'<div id="summary"></div><pre id="selftest" hidden></pre>'
        f"<script>{script}</script></body></html>\n"
    )
    path = paths.sweep_page(out)
    path.write_text(page)
    return path
