"""The layer command's report: one HTML page for the layer (pictures linked from the same folder)."""
from __future__ import annotations

import html
import os

from ..files import write_text
from ..defaults import MAX_LOGIT_DIFF
from .style import concept_colour, sub_label
from ..model.units import describe_positions

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;
 line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0 1em} td,th{border:1px solid #ddd;padding:3px 9px;text-align:right;
 font-variant-numeric:tabular-nums;vertical-align:top} th{background:#f4f4f4} td.l,th.l{text-align:left}
tr.best td{background:#e8f4ea;font-weight:600} .muted{color:#666} .ok{color:#1a7f37} .bad{color:#b42318}
.plots{display:flex;flex-wrap:wrap;gap:1em} .plots a{width:48%;min-width:320px} .plots img{width:100%;border:1px solid #eee}
img.teaser{max-width:100%;border:1px solid #eee} img.strip{max-width:100%;height:72px;border:1px solid #eee} .card{border:1px solid #e3e3e3;border-radius:6px;
 padding:.2em 1.2em 1em;margin:1.5em 0} .up{color:#1a7f37} .down{color:#b42318} a{color:#1f5fbf}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list], left: int = 0, classes: list[str] | None = None) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join(f'<tr class="{(classes or [""] * len(rows))[r]}">'
                   + "".join(f'<td class="{"l" if i < left else ""}">{v}</td>' for i, v in enumerate(row)) + "</tr>"
                   for r, row in enumerate(rows))
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(path: str, base: str, cls: str = "") -> str:
    if not path or not os.path.isfile(path):
        return f'<p class="muted">(no picture {_e(os.path.basename(path or ""))})</p>'
    rel = os.path.relpath(path, base)
    return f'<a href="{_e(rel)}"><img class="{cls}" alt="{_e(os.path.basename(path))}" src="{_e(rel)}"></a>'


def _pct(v) -> str:
    return "–" if v is None else f"{v:.0%}"


def _concepts_text(concepts: list[list[int]], names, signs=None) -> str:
    signs = signs or [1] * len(concepts)
    return " | ".join(f'<b style="color:{concept_colour(j)}">{j}</b>: ' + _e(names.labels(cs))
                      + (' <span class="down" title="served by the unit going down: read as -activation">(−)</span>'
                         if s < 0 else "") for j, (cs, s) in enumerate(zip(concepts, signs), 1))


def _overview(ev, files: dict, names, summary: dict) -> str:
    rows = []
    for r in sorted(ev.channels, key=lambda r: -r.gain):
        gain = " / ".join(f'<span class="{"up" if g >= 0.005 else "down" if g <= -0.005 else "muted"}">{g:+.0%}</span>'
                          for g in (a - b for a, b in zip(r.after, r.before)))
        flags = summary["channels"][str(r.channel)]["flags"]
        rows.append([f'<a href="#c{r.channel}">{r.channel}</a>', len(r.concepts),
                     _concepts_text(r.concepts, names, r.scored.signs),
                     f"{files[r.channel].record.best_rho:.2f}", " / ".join(_pct(v) for v in r.before),
                     " / ".join(_pct(v) for v in r.after), " / ".join(_pct(v) for v in r.baseline), gain,
                     " / ".join(_auc(v) for v in r.auc_before), " / ".join(_auc(v) for v in r.auc_after),
                     " / ".join(_auc(v) for v in r.pair_after),
                     "<br>".join(f'<span class="down">D{j}: {_e(", ".join(fl))}</span>'
                                 for j, fl in enumerate(flags, 1) if fl) or '<span class="ok">none</span>'])
    return _table(["channel", "k", "concepts", "best rho", "before: original channel, share in concept j",
                   "after: concept channel j, share in concept j", "baseline: random channels, share in the n_j "
                   "classes each is most relevant to (training images)", "gain per concept (after - before)",
                   "AUC before: original channel, concept j against every other val image",
                   "AUC after: concept channel j", "pairwise AUC after: concept j against the other concepts",
                   "flags"], rows, left=3)


RULES = {"paper": "the paper's (an input goes to the first concept j with rho A_j above every other A_l)",
         "positive": "positive (as the paper's, but only inputs with A_j > 0 can be exclusive to concept j; inputs "
                     "that inhibit on average stay shared)",
         "search": "searched (from the paper's sets, single inputs moved between the shared and the exclusive sets "
                   "while the concept channels' mean AUC on training images rose; held-out training images stopped "
                   "it; every split stays exact)",
         "function": "functional (the searched sets, then the fewest inputs moved so that ablating each concept "
                     "channel takes, as predicted along each ablation's path on training images, its own concepts' "
                     "logit evidence and the least of any other class's; every split stays exact)"}
ORIENTATION = {"none": "none: every concept read as +activation",
               "gradient": "gradient: each concept read in the direction that raises its logit (the sign of the mean "
                           "gradient of the class logit at the unit over the concept's training images)"}


def _effects_table(summary: dict, names) -> str:
    """One table for the layer: per split unit and concept, purity, AUC, what ablating the concept unit does to its
    own concept (against the original's ablation), to the other concepts and elsewhere, steering, certified."""
    cert = summary.get("certification")
    if not cert:
        return ""
    rows, classes = [], []
    num = lambda v, f=".0%": "–" if v is None else format(v, f)  # noqa: E731
    for c, ch in summary["channels"].items():
        for j, e in enumerate(ch["effects"] or [], 1):
            steer = e.get("steer")
            rows.append([f'<a href="#c{c}">{c}</a>', f'<b style="color:{concept_colour(j)}">D{j}</b>',
                         _e(", ".join(ch["class_names"][j - 1])), _pct(ch["purity"]["concepts"][j - 1]),
                         _auc(ch["auc"]["concepts"][j - 1]), num(e["own"], ".3f"), num(e["own_original"], ".3f"),
                         num(e["own_share"]), num(e["cross_share"]), num(e["elsewhere"]),
                         f"{e['collateral']:.3f} ({_e(e.get('collateral_class_name') or '–')})",
                         "–" if not steer else f"{steer['concept']:+.3f} / {steer['other_concepts']:+.3f}",
                         '<b class="ok">yes</b>' if e["certified"] else '<span class="bad">no</span>'])
            classes.append("best" if e["certified"] else "")
    t = cert["tolerance"]
    head = (f"<h2>What each concept unit does: ablation and steering</h2><p>One pass over {cert['images']} validation "
            f"images ablates every original unit and every concept unit (its output set to its {cert['reference']} "
            "output map over training images) and steers every concept unit (its output times "
            f"{cert.get('steer') or '–'}), all stacked in each batch ({cert['seconds']:.1f} s). Effects are drops of each "
            "image's own-class logit. <b>own</b>: the mean drop on the concept's images when its concept unit is "
            "ablated; <b>original</b>: the same when the whole original unit is; <b>own share</b>: own / original; "
            "<b>cross share</b>: the largest share of another concept's drop (under the original's ablation) that "
            "ablating this concept unit causes; <b>elsewhere</b>: the largest extra drop on a class outside the unit's "
            "concepts beyond the original's ablation there, as a share of the original's own drop. <b>Certified</b>: "
            f"own share ≥ {1 - t:.0%}, cross share ≤ {t:.0%} and elsewhere ≤ {t:.0%}. "
            f"<b>{cert['certified']} of {cert['concept_units']}</b> concept units are certified.</p>")
    fig = summary.get("effects_figure")
    head += _img(fig, os.path.dirname(os.path.dirname(fig)), "teaser") if fig else ""
    return head + _table(["unit", "concept unit", "concept", "purity", "AUC", "own", "original", "own share",
                          "cross share", "elsewhere", "largest collateral (class)",
                          "steering: Δ logit of the concept's classes / of the other concepts'", "certified"],
                         rows, left=3, classes=classes)


def _search_text(search: dict | None) -> str:
    if not search:
        return ""
    fit, held = search["fit_objective"], search["held_objective"]
    return (f"<p>Searched sets: {search['moves']} moves kept of {search['moves_tried']} tried, from the paper's sets "
            f"at this rho; the concept channels' mean AUC on the fitting training images {fit[0]:.3f} → {fit[1]:.3f}, "
            f"on the held-out ones {held[0]:.3f} → {held[1]:.3f} ({search['images']['fit']} and "
            f"{search['images']['held']} images).</p>" + _function_text(search.get("function")))


def _function_text(how: dict | None) -> str:
    if not how:
        return ""
    before, after = how["worst"]
    if before is None:
        return f"<p>Functional sets: {how['status']}.</p>"
    return (f"<p>Functional sets: {how['moved']} inputs moved from the searched sets; the worst predicted share "
            f"(1 - own, cross or elsewhere, on the training images, read along each ablation's path) {before:.2f} → "
            f"{after:.2f} ({how['status']}).</p>")


def _orientation_text(signs) -> str:
    if not signs or min(signs) > 0:
        return ""
    down = ", ".join(str(j) for j, s in enumerate(signs, 1) if s < 0)
    return (f"<p>Concept {down} lowers the unit's output (its logit falls as the unit rises): its concept channel and "
            "the original are read as −activation for it.</p>")


def _references(strips: list[str], r, names, base: str) -> str:
    """Each concept's reference images by relevance (a strip per concept)."""
    if not strips:
        return ""
    rows = []
    for j, (path, ref) in enumerate(zip(strips, r.by_relevance), 1):
        classes = ", ".join(sorted({names.label(t) for t in ref["labels"]})) or "none"
        rows.append(f'<p><b style="color:{concept_colour(j)}">D{j}</b> ({_e(classes)}): {_img(path, base, "strip")}</p>')
    return ("<h4>Reference images by relevance: the concept's validation images where its concept channel "
            "contributes most to the image's own class logit (its output times the logit's gradient there)</h4>"
            + "".join(rows))


def _heatmaps(strips: list[str], base: str) -> str:
    """Each concept's reference images with its concept unit's conditional heatmap over them."""
    if not strips:
        return ""
    rows = "".join(f'<p><b style="color:{concept_colour(j)}">D{j}</b>: {_img(p, base, "strip")}</p>'
                   for j, p in enumerate(strips, 1))
    return ("<h4>Where in these images each concept unit's activation comes from (gradient × input through that "
            "unit alone; its positive part)</h4>" + rows)


def _auc(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _sweep(rec) -> str:
    rows, classes = [], []
    for rho in rec.rhos:
        key = f"{rho:.2f}"
        src = rec.sources[key]
        best = abs(rho - rec.best_rho) < 1e-9
        rows.append([key] + [len(src[f"concept{j}"]) for j in range(1, rec.k + 1)] + [len(src["shared"]),
                    f"{rec.scores[key]:.4g}" + (" ◀ best" if best else "")])
        classes.append("best" if best else "")
    return _table(["rho"] + [f"|S{j}|" for j in range(1, rec.k + 1)] + ["|S0|", "score"], rows, classes=classes)


def _quantitative(f) -> str:
    k = len(f.quantitative)
    rows, shares = [], []
    for j, e in enumerate(f.quantitative, 1):
        mean = e.get("mean") or [None] * (k + 1)
        rows.append([f"concept {j}", e.get("rows", 0), e.get("images", 0)]
                    + ["–" if m is None else f"{m:.3f}" for m in mean])
        sh = e.get("shares") or {}
        cells = [(a, b) for a, b in zip(sh.get("exclusive", []) + [sh.get("shared")],
                                        sh.get("exclusive_median", []) + [sh.get("shared_median")])]
        shares.append([f"concept {j}", e.get("rows", 0)]
                      + ["–" if a is None else f"{a:.3f} <span class='muted'>({b:.3f})</span>" for a, b in cells])
    paper = _table(["images of", "rows (rel ≥ τ)", "images"] + [f"D{j} / orig" for j in range(1, k + 1)]
                   + ["Res / orig"], rows, left=1)
    return paper + ("<p>The same images as shares that sum to 1: what each concept channel adds beyond the shared "
                    "part, (D<sub>j</sub> − Res) / orig, and the shared part with the bias once, Res / orig; mean "
                    "<span class='muted'>(median)</span>. The columns above count the shared part and the bias in "
                    "every D<sub>j</sub>, as the paper's stage 4 does.</p>"
                    + _table(["images of", "rows"] + [f"exclusive {j}" for j in range(1, k + 1)] + ["shared"], shares,
                             left=1) if any(e.get("shares") for e in f.quantitative) else "")


def _why(r, names, ch: dict) -> str:
    """Why the channel was split (each relevant class's share of images where it is important, the least
    similar concepts) and where each concept unit fires outside its concept."""
    cand, parts = ch["why"]["candidate"], []
    if cand:
        shares = ", ".join(f"{_e(names.label(t))} {s:.0%}" for t, s in zip(cand["classes"], cand["shares"]))
        group = {t: j for j, cs in enumerate(r.concepts) for t in cs}
        cross = [v for a, t in enumerate(cand["classes"]) for b, u in enumerate(cand["classes"])
                 if group.get(t) != group.get(u) for v in [cand["similarity"][a][b]]]
        parts.append(f"<p><b>Why polysemantic:</b> important (relevance ≥ τ) on these shares of its relevant classes' "
                     f"images: {shares}; the most alike classes of different concepts have ARV cosine "
                     f"{max(cross) if cross else float('nan'):.2f}.</p>")
    outside = "; ".join(f"D{j}: " + (", ".join(f"{_e(names.label(t))} ({m:.3g})" for t, m in o) or "–")
                        for j, o in enumerate(ch["why"]["outside"], 1))
    parts.append(f"<p><b>Outside its concept</b>, each concept channel fires most (mean activation) on: {outside}."
                 + ("" if not any(ch["flags"]) else " <span class=\"down\">Flagged: " + _e("; ".join(
                     f"D{j}: {', '.join(fl)}" for j, fl in enumerate(ch["flags"], 1) if fl)) + "</span>") + "</p>")
    return "".join(parts)


def _card(r, f, names, base: str, summary_ch: dict) -> str:
    k, rec = len(r.concepts), f.record
    purity = _table(["channel"] + [f"concept {j}" for j in range(1, k + 1)],
                    [[_e(sub_label("original"))] + [_pct(v) for v in r.before]]
                    + [[_e(sub_label(f"D{j}")), *(["–"] * (j - 1)), _pct(v), *(["–"] * (k - j))]
                       for j, v in enumerate(r.after, 1)]
                    + [["baseline (random channels, the n_j classes each is most relevant to)"] + [_pct(v) for v in r.baseline]],
                    left=1)
    inside, n = r.auc_images
    why = _why(r, names, summary_ch)
    auc = _table(["channel"] + [f"concept {j} ({m} of {n} images)" for j, m in enumerate(inside, 1)],
                 [[_e(sub_label("original"))] + [_auc(v) for v in r.auc_before]]
                 + [[_e(sub_label(f"D{j}")), *(["–"] * (j - 1)), _auc(v), *(["–"] * (k - j))]
                    for j, v in enumerate(r.auc_after, 1)], left=1)
    pairs = _table(["channel"] + [f"concept {j} against the other concepts" for j in range(1, k + 1)],
                   [[_e(sub_label("original"))] + [_auc(v) for v in r.pair_before]]
                   + [[_e(sub_label(f"D{j}")), *(["–"] * (j - 1)), _auc(v), *(["–"] * (k - j))]
                      for j, v in enumerate(r.pair_after, 1)], left=1)
    return "\n".join([
        f'<div class="card" id="c{r.channel}"><h3>Channel {r.channel}: {k} concepts</h3>',
        f"<p>{_concepts_text(r.concepts, names, r.scored.signs)}</p>",
        f"<p>best rho <b>{rec.best_rho:.2f}</b>; training images {'read' if rec.search else 'scored'} per concept: "
        + ", ".join(str(v) for v in rec.train_images.values()) + f'; record <code>{_e(rec.dir)}</code></p>',
        _search_text(rec.search), _orientation_text(r.scored.signs),
        "<details><summary>rho sweep</summary>", _sweep(rec), "</details>",
        "<h4>What the channels respond to (top validation images; frames: colour of the concept, gray other)</h4>",
        _img(f.pictures.get("teaser", ""), base, "teaser"), _references(f.pictures.get("relevance") or [], r, names, base),
        _heatmaps(f.pictures.get("heatmaps") or [], base),
        why, "<h4>Purity of the top images</h4>", purity,
        "<h4>Selectivity on every validation image: ROC AUC of the activation for the concept's images against "
        "all others (1: perfect, 0.5: chance)</h4>", auc,
        "<h4>Pairwise: the concept's images against the other concepts' images only (the split's own job)</h4>", pairs,
        "<h4>Activations on the concepts' validation images</h4>",
        '<div class="plots">' + "".join(_img(p, base) for p in f.plots if p.endswith(".png")) + "</div>",
        "<h4>Share of the original activation (mean over images with relative attribution ≥ τ)</h4>",
        _quantitative(f), "</div>"])


def write_layer_report(path: str, summary: dict, ev, files: dict, names, seconds: dict,
                       notes: dict | None = None) -> None:
    """Write the layer's report page (atomically) from the layer's evaluation ``ev`` and each channel's
    ``files`` (:class:`utils.stages.layer_output.ChannelFiles`); pictures and plots are linked relative to ``path``."""
    base = os.path.dirname(os.path.abspath(path))
    diff = summary["max_abs_logit_diff"]
    tol = summary.get("logit_tolerance", MAX_LOGIT_DIFF)  # layer.json before it: the absolute bound
    b = summary["baseline_purity"]
    ks = sorted({len(r.concepts) for r in ev.channels})
    settings = [["model", _e(summary["model"])], ["weights", _e(summary["weights"])], ["layer", _e(summary["layer"])],
                ["tau, p, gamma", f"{summary['tau']}, {summary['p']}, {summary['gamma_high']}"],
                ["split rule", _e(RULES.get(summary["split_rule"], summary["split_rule"]))],
                ["orientation", _e(ORIENTATION.get(summary.get("orientation", "none"), ""))],
                ["split channels", f"{len(ev.channels)} (k = {', '.join(map(str, ks))})"],
                ["one network, max |logit difference|", f'<b class="{"ok" if diff <= tol else "bad"}">'
                 f'{diff:.2e}</b> on {summary["checked_images"]} validation images'],
                ["purity of the concept channels (mean)", _pct(b["concept_channels_mean"])],
                [f"purity baseline: {len(b['channels'])} random channels that are no candidate, the share of their "
                 f"top {summary['top_k']} in the n classes each is most relevant to on the training images, chosen "
                 f"before any validation image is seen, as a concept's classes are (n = the concept's classes)",
                 ", ".join(f"n = {n}: {_pct(v)}" for n, v in b["by_classes"].items())
                 + f"; mean over the concepts above {_pct(b['mean'])}"],
                ["seconds", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())],
                ["the whole network", f'<code>{_e(summary["export"])}</code>']]
    if summary.get("unit") == "Linear":
        where = describe_positions(summary["positions"])
        settings.insert(3, ["units", f"the Linear layer's output neurons (called channels below), applied at every "
                                     f"position; the positions that count: {where} ({summary['positions']})"])
    settings += [[_e(k), _e(v)] for k, v in (notes or {}).items()]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(summary['model'])} {_e(summary['layer'])}"
            f"</title><style>{CSS}</style></head><body>",
            f"<h1>Disentangled layer: {_e(summary['model'])} {_e(summary['layer'])}</h1>",
            '<p class="muted">Every polysemantic channel of the layer, its concepts found from the data (complete '
            "linkage of its classes' average relevance vectors), split into one channel per concept plus a shared "
            "residual, all in one network that computes the same logits (Hesse et al., CVPRW 2025, extended to k "
            "concepts). Purity: the share of a channel's top validation images in a concept's classes; its "
            "baseline is the same share for random channels in the classes they are most relevant to on the "
            "training images. A concept marked (−) is served by its unit going down: every reading of it (top "
            "images, purity, AUC, pictures) is of −activation.</p>",
            *(f'<p class="bad"><b>warning:</b> {_e(w)}</p>' for w in summary.get("warnings", [])),
            "<h2>Settings</h2>", _table(["", ""], settings, left=2),
            "<h2>Split channels, by purity gain</h2>", _overview(ev, files, names, summary),
            _effects_table(summary, names),
            "<h2>Channels</h2>"] + [_card(r, files[r.channel], names, base, summary["channels"][str(r.channel)])
                                    for r in sorted(ev.channels, key=lambda r: -r.gain)]
    write_text(path, "\n".join(page + ["</body></html>"]))


def _cluster_card(c: str, ch: dict, base: str, summary: dict) -> str:
    """One unit split by its clusters: per concept what the cluster is (its strongest training images), what its
    concept unit responds to on held-out images, the AUC and purity of both units for the concept."""
    k, pic, lab = len(ch["concepts"]), ch["pictures"], ch.get("labels")
    rows = [f'<p><b>Original</b>, top {summary["top_k"]} held-out images'
            + (f' <span class="muted">(mostly {_e(lab["original"]["name"])}, {lab["original"]["share"]:.0%})</span>'
               if lab else "") + f": {_img(pic['original'], base, 'strip')}</p>"]
    for j in range(1, k + 1):
        colour = concept_colour(j)
        mostly = lab[f"D{j}"] if lab else None
        rows.append(f'<p><b style="color:{colour}">Cluster {j}</b>: {len(ch["concepts"][j - 1])} of the unit\'s top '
                    f'training images, strongest first: {_img(pic["clusters"][j - 1], base, "strip")}</p>')
        rows.append(f'<p><b style="color:{colour}">Disentangled {j}</b>, top held-out images'
                    + (f' <span class="muted">(mostly {_e(mostly["name"])}, {mostly["share"]:.0%})</span>'
                       if mostly else "") + f': {_img(pic["units"][j - 1], base, "strip")}'
                    + (f' feature visualisation: {_img(pic["fv"][j - 1], base, "strip")}' if pic.get("fv") else "")
                    + "</p>")
    auc, pur = ch["auc"], ch["purity"]
    table = _table(["unit"] + [f"concept {j} ({m} of {auc['images']} held-out images)"
                               for j, m in enumerate(auc["images_in_concept"], 1)],
                   [["Original, AUC"] + [_auc(v) for v in auc["original"]],
                    ["Disentangled j, AUC"] + [_auc(v) for v in auc["concepts"]],
                    ["Original, purity"] + [_pct(v) for v in pur["original"]],
                    ["Disentangled j, purity"] + [_pct(v) for v in pur["concepts"]]]
                   + ([[f"Original, AUC for the class ({_e(' / '.join(lab['auc']['classes']))})"]
                       + [_auc(v) for v in lab["auc"]["original"]],
                       ["Disentangled j, AUC for the class"] + [_auc(v) for v in lab["auc"]["concepts"]]]
                      if lab else [])
                   + ([["Disentangled j ablated: certified (own share, cross share, elsewhere; the output's relative "
                        "change)"] + [("yes" if e["certified"] else "no") + " (" + ", ".join(
                           "–" if v is None else f"{v:.0%}" for v in (e["own_share"], e["cross_share"], e["elsewhere"]))
                        + ")" for e in ch["effects"]]] if ch.get("effects") else []), left=1)
    flags = "; ".join(f"D{j}: {', '.join(fl)}" for j, fl in enumerate(ch["flags"], 1) if fl)
    return "\n".join([f'<div class="card" id="c{c}"><h3>Unit {c}: {k} concepts</h3>',
                      f"<p>Its clusters' mean contributions are at most {ch['closest']:.2f} alike (cosine); best rho "
                      f"{ch['best_rho']:.2f}.</p>", _search_text(ch.get("search")), *rows,
                      "<h4>The held-out images of each concept: AUC of the unit's activation for them against every "
                      "other held-out image, and the share of the unit's top images that are theirs (purity)"
                      + ("; with labels, the AUC for the class each concept unit's top images mostly hold" if lab
                         else "") + "</h4>",
                      table, f'<p class="down">Flagged: {_e(flags)}</p>' if flags else "", "</div>"])


def write_clusters_report(path: str, summary: dict, seconds: dict, notes: dict | None = None) -> None:
    """Write the report of a layer split by concepts from clusters (``summary``: its layer.json) atomically."""
    base = os.path.dirname(os.path.abspath(path))
    diff, tol = summary["max_abs_logit_diff"], summary["logit_tolerance"]
    chans = summary["channels"]
    settings = [["model", _e(summary["model"])], ["weights", _e(summary["weights"])], ["layer", _e(summary["layer"])],
                ["concepts", f"from clusters of each unit's top {summary['top_n']} training images by activation "
                             f"(k-means, k ≤ {summary['clusters']}; clusters under {summary['min_images']} images "
                             f"dropped; clusters at least {summary['gamma_high']} alike merged)"],
                ["units", f"{summary['units']} read, {summary['candidates']} with two or more concepts, "
                          f"{len(chans)} split"],
                ["images", f"{summary['training_images']} to find concepts in; {summary['validation_images']} held "
                           f"out to evaluate on ({_e(summary['held_out'])})"],
                ["labels", "read only to say which class each top-k mostly holds" if summary["labelled"]
                 else "none (a flat folder)"],
                ["one network, max |output difference|", f'<b class="{"ok" if diff <= tol else "bad"}">{diff:.2e}</b> '
                 f'on {summary["checked_images"]} held-out images'],
                ["mean AUC for the concept: original → concept units",
                 f"{_auc(_mean_of(chans, 'auc', 'original'))} → {_auc(_mean_of(chans, 'auc', 'concepts'))}"],
                ["mean purity: original → concept units", f"{_pct(_mean_of(chans, 'purity', 'original'))} → {_pct(_mean_of(chans, 'purity', 'concepts'))}"],
                ["seconds", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())],
                ["the whole network", f'<code>{_e(summary["export"])}</code>']]
    if summary.get("unit") == "Linear":
        settings.insert(3, ["units", f"the Linear layer's output neurons; the positions that count: "
                                     f"{describe_positions(summary['positions'])} ({summary['positions']})"])
    settings += [[_e(k), _e(v)] for k, v in (notes or {}).items()]
    rows = [[f'<a href="#c{c}">{c}</a>', len(ch["concepts"]), f"{ch['closest']:.2f}",
             " / ".join(_auc(v) for v in ch["auc"]["original"]), " / ".join(_auc(v) for v in ch["auc"]["concepts"]),
             " / ".join(_pct(v) for v in ch["purity"]["original"]), " / ".join(_pct(v) for v in ch["purity"]["concepts"]),
             _e(" | ".join(f"{m['name']} {m['share']:.0%}" for m in
                           [ch["labels"][f"D{j}"] for j in range(1, len(ch["concepts"]) + 1)]) if ch.get("labels") else "–")]
            for c, ch in chans.items()]
    overview = _table(["unit", "k", "clusters' cosine", "AUC: original", "AUC: concept units", "purity: original",
                       "purity: concept units", "concept units' top images mostly (labels)"], rows, left=1)
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(summary['model'])} {_e(summary['layer'])}"
            f"</title><style>{CSS}</style></head><body>",
            f"<h1>Disentangled layer, concepts from clusters: {_e(summary['model'])} {_e(summary['layer'])}</h1>",
            '<p class="muted">No label was used to find or split these units. For each unit, its strongest training '
            "images are grouped by how they reach it (which of the layer's inputs carry its activation on them): "
            "images that reach it through different inputs are different concepts. Each unit with two or more "
            "concepts is split into one unit per concept plus a shared residual, all in one network that computes "
            "the same outputs. A held-out image belongs to a concept when it is among the images the unit or one of its "
            "concept units fires on most (the same share of the held-out images as the clustered images are of the "
            "training images) and its contributions are most alike that concept's mean; every other held-out image "
            "belongs to none.</p>",
            "<h2>Settings</h2>", _table(["", ""], settings, left=2),
            "<h2>Split units</h2>", overview, "<h2>Units</h2>"] + [_cluster_card(c, ch, base, summary)
                                                                  for c, ch in chans.items()]
    write_text(path, "\n".join(page + ["</body></html>"]))


def _mean_of(chans: dict, key: str, which: str) -> float | None:
    values = [v for ch in chans.values() for v in ch[key][which] if v is not None]
    return sum(values) / len(values) if values else None
