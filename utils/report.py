"""One self-contained HTML report of a pipeline run (images embedded as data URIs)."""
from __future__ import annotations

import base64
import html
import os

from .files import write_text
from .records import Record
from .split import sub_label
from .store import Store

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
 line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin-top:1.5em} table{border-collapse:collapse;margin:.5em 0 1em} td,th{border:1px solid #ddd;padding:3px 9px;
 text-align:right;font-variant-numeric:tabular-nums} th{background:#f4f4f4} td.l,th.l{text-align:left}
tr.best td{background:#e8f4ea;font-weight:600} .muted{color:#666} .ok{color:#1a7f37} .bad{color:#b42318}
.plots{display:flex;flex-wrap:wrap;gap:1em} .plots img{width:48%;min-width:320px;border:1px solid #eee}
img.teaser{max-width:100%;border:1px solid #eee} .card{border:1px solid #e3e3e3;border-radius:6px;padding:.2em 1.2em 1em;
 margin:1.5em 0}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _img(path: str, cls: str = "") -> str:
    if not path or not os.path.isfile(path):
        return f'<p class="muted">(missing image {_e(path)})</p>'
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img class="{cls}" alt="{_e(os.path.basename(path))}" src="data:image/png;base64,{data}">'


def _table(header: list[str] | None, rows: list[list], left: int = 0, classes: list[str] | None = None) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header or []))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{classes[r]}"' if classes and classes[r] else ""
        tds = "".join(f'<td class="{"l" if i < left else ""}">{v}</td>' for i, v in enumerate(row))
        body.append(f"<tr{cls}>{tds}</tr>")
    head = f"<tr>{th}</tr>" if th else ""
    return f"<table>{head}{''.join(body)}</table>"


def _num(v, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _sweep_table(rec: Record) -> str:
    rows, classes = [], []
    k = rec.k
    for rho in rec.rhos:
        key = f"{rho:.2f}"
        src = rec.sources[key]
        best = abs(rho - rec.best_rho) < 1e-9
        rows.append([f"{rho:.2f}"] + [len(src[f"concept{j}"]) for j in range(1, k + 1)] + [len(src["shared"]),
                    f"{rec.scores[key]:.4g}" + (" ◀ best" if best else "")])
        classes.append("best" if best else "")
    return _table(["rho"] + [f"|S{j}|" for j in range(1, k + 1)] + ["|S0|", "score"], rows, classes=classes)


def _quant_table(s4: dict, k: int) -> str:
    rows = []
    for j in range(1, k + 1):
        entry = s4.get(f"concept{j}", {})
        mean = entry.get("mean") or [None] * (k + 1)
        rows.append([f"concept {j}: {_e(', '.join(entry.get('classes', [])))}", entry.get("rows", 0),
                     entry.get("images", 0)] + [_num(m, 3) for m in mean])
    head = [f"D{j} / orig" for j in range(1, k + 1)] + ["Res / orig"]
    return _table(["images of", "rows (rel ≥ τ)", "images"] + head, rows, left=1)


def _purity_table(purity: dict) -> str:
    k = sum(key.startswith("concept") for key in next(iter(purity.values()), {}))
    rows = [[_e(sub_label(name))] + [_num(p.get(f"concept{j}"), 2) for j in range(1, k + 1)] + [_num(p.get("other"), 2)]
            for name, p in purity.items()]
    return _table(["channel"] + [f"concept {j}" for j in range(1, k + 1)] + ["other"], rows, left=1)


def _result_card(i: int, res: dict, store: Store) -> str:
    rec, s4, pair = res["record"], res["stage4"], res["pair"]
    names = " &nbsp;vs&nbsp; ".join(_e(store.names.labels(cs)) for cs in rec.concepts)
    diff = rec.max_abs_logit_diff
    verdict = "ok" if diff is not None and diff <= 1e-3 else "bad"
    scored = " + ".join(str(rec.train_images[f"concept{j}"]) for j in range(1, rec.k + 1))
    parts = [f'<div class="card"><h3>{i}. Channel {rec.channel}: {names}</h3>',
             f"<p>cosine similarity of the two ARVs s = {pair['cosine_similarity']:.4f}; best rho "
             f"<b>{rec.best_rho:.2f}</b> (score {rec.scores[f'{rec.best_rho:.2f}']:.4g}); "
             f"training images scored: {scored}.</p>",
             f'<p>Equivalence: largest |logit difference| between the original and the disentangled network on '
             f'{rec.equivalence_images} images: <b class="{verdict}">{diff:.2e}</b></p>',
             "<details><summary>rho sweep</summary>", _sweep_table(rec),
             '<p class="muted">score = mean over concept-1 images of pos(D1)/(pos(D2)+1e-5) + the same for '
             "concept 2: images on which one sub-channel is silent make it large.</p></details>",
             "<h4>Activations on validation images</h4>",
             '<div class="plots">' + "".join(_img(p) for p in s4.get("plots", []) if p.endswith(".png")) + "</div>",
             "<h4>Share of the original activation (mean over images with relative attribution ≥ τ)</h4>",
             _quant_table(s4, rec.k)]
    pics = res.get("pictures")
    if pics:
        parts.append("<h4>What the channels respond to</h4>")
        parts.append(_img(os.path.join(pics["out_dir"], "teaser.png"), "teaser"))
        if pics.get("purity"):
            parts.append(f"<p>Purity: share of the top-{pics.get('top_k', '')} images of each channel that belong "
                         f"to each concept's classes.</p>" + _purity_table(pics["purity"]))
    parts.append("</div>")
    return "\n".join(parts)


def write_report(path: str, settings: dict, store: Store, pairs: list[dict], candidates: dict, results: list[dict],
                 timings: dict) -> None:
    """Write the report page (atomic)."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>Disentangled channels: {_e(settings['model'])}"
           f"</title><style>{CSS}</style></head><body>",
           f"<h1>Disentangling polysemantic channels: {_e(settings['model'])} {_e(settings['layer'])}</h1>",
           '<p class="muted">Hesse et al., CVPRW 2025: channels relevant to two classes through dissimilar inputs are '
           "split into one channel per concept plus a shared residual; the network computes the same logits.</p>",
           "<h2>Settings</h2>", _table(None, [[_e(k), _e(v)] for k, v in settings.items()], left=2),
           "<h2>Timings</h2>",
           _table(["stage", "seconds", "images", "images/s"],
                  [[_e(k), f"{v['seconds']:.1f}", v.get("images", "") or "",
                    f"{v['images_per_second']:.1f}" if v.get("images_per_second") else ""] for k, v in timings.items()],
                  left=1),
           f"<h2>Gamma-polysemantic pairs</h2><p>{len(candidates)} candidate channels (relevant to two or more "
           f"classes); {len(pairs)} pairs with cosine similarity in {_e(settings['gamma'])}.</p>"]
    if pairs:
        out.append(_table(["channel", "class 1", "class 2", "cosine similarity"],
                          [[p["channel"], _e(store.names.label(p["class1"])), _e(store.names.label(p["class2"])),
                            f"{p['cosine_similarity']:.4f}"] for p in pairs[:50]], left=0))
    else:
        out.append('<p class="bad">No pair found at these settings: lower --p or raise --cos_sim_high.</p>')
    out.append("<h2>Disentangled channels</h2>")
    out += [_result_card(i + 1, r, store) for i, r in enumerate(results)]
    out.append("</body></html>")
    write_text(path, "\n".join(out))
