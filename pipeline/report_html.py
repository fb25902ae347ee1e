"""The run report as one self-contained HTML page: CSS, SVG plots and JPEG thumbnails inline, no
network, no server; it opens from a bucket or a laptop. Facts come from pipeline.report.collect.

Every number a test checks carries `data-count="<name>"`, so a browser test can read the rendered
page and compare it with counts computed from the tables directly.
"""
from __future__ import annotations

import html
import json
import time
from typing import Any

PLOT_W, PLOT_H = 420, 160  # px: one histogram

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1b1f24;color:#fff;padding:18px 28px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#b8c0cc;font-size:13px;word-break:break-all}
main{padding:8px 28px 40px;max-width:1280px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;margin:16px 0;padding:14px 18px}
h2{font-size:16px;margin:0 0 10px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #e1e4e8;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:22px}.card span{color:#57606a;font-size:12px}
.ok b{color:#1a7f37}.error b{color:#cf222e}.retry b{color:#9a6700}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eaecef;vertical-align:top}
th{cursor:pointer;user-select:none;background:#f6f8fa}td.num,th.num{text-align:right}
code{font-size:12px;word-break:break-all}
.plots{display:flex;flex-wrap:wrap;gap:18px}.plot{font-size:12px;color:#57606a}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:12px}
figure{margin:0;border:1px solid #e1e4e8;border-radius:6px;overflow:hidden;background:#fafbfc}
figure img{display:block;width:100%}figcaption{padding:4px 8px;font-size:12px;word-break:break-all}
.muted{color:#57606a}
"""

JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var num = th.classList.contains('num'), dir = th.dataset.dir === 'asc' ? -1 : 1;
    th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      return dir * (num ? parseFloat(x) - parseFloat(y) : x.localeCompare(y));
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
document.body.dataset.ready = '1';
"""


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def count(name: str, value: Any) -> str:
    return f'<span data-count="{esc(name)}">{esc(value)}</span>'


def render(facts: dict[str, Any]) -> str:
    """facts (pipeline.report.collect) -> the whole page."""
    parts = [_summary(facts), _runs(facts["runs"]), _errors(facts), _proposals(facts), _throughput(facts["throughput"]),
             _gallery(facts["gallery"])]
    if "recall" in facts:
        parts.insert(4, _recall(facts["recall"]))
    made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>InstanceFCN report: '
            f'{esc(facts["output"])}</title><meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<style>{CSS}</style></head><body><header><h1>InstanceFCN run report</h1>'
            f'<p>{esc(facts["output"])} &middot; made {made}</p></header><main>{"".join(parts)}</main>'
            f'<script>{JS}</script></body></html>')


def _summary(facts: dict[str, Any]) -> str:
    im = facts["images"]
    cards = [("total", "images", "images.total"), ("ok", "ok", "images.ok"), ("error", "errors", "images.error"),
             ("retry", "to retry", "images.retry"), ("", "proposals", "images.proposals")]
    html_cards = "".join(f'<div class="card {cls}"><b>{count(name, im[name.split(".")[1]])}</b><span>{label}</span></div>'
                         for cls, label, name in cards)
    rows = "".join(f'<tr><td>{esc(name)}</td><td class="num">{t["median"]:.1f}</td><td class="num">{t["p90"]:.1f}</td></tr>'
                   for name, t in facts["timings"].items())
    timing = ('<table style="max-width:420px;margin-top:12px"><thead><tr><th>per ok image</th><th class="num">median ms'
              f'</th><th class="num">p90 ms</th></tr></thead><tbody>{rows}</tbody></table>') if rows else ""
    return f'<section id="summary"><h2>Inputs</h2><div class="cards">{html_cards}</div>{timing}</section>'


def _runs(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return _empty("runs", "Runs", "No run recorded in the table history.")
    rows = []
    for r in runs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["started"] / 1000))
        settings = json.dumps(r.get("settings") or {}, sort_keys=True)
        rate = "" if r.get("images_per_s") is None else f"{r['images_per_s']:.2f}"
        rows.append(f'<tr><td><code>{esc(r["run_id"])}</code></td><td>{when}</td>'
                    f'<td class="num" data-v="{r["images"]}">{count("run." + r["run_id"] + ".images", r["images"])}</td>'
                    f'<td class="num" data-v="{r["rows_in_table"]}">'
                    f'{count("run." + r["run_id"] + ".rows", r["rows_in_table"])}</td>'
                    f'<td class="num">{rate}</td><td>{"complete" if r["complete"] else "incomplete"}: '
                    f'{esc(r.get("ended"))}</td><td><code>{esc(settings)}</code></td></tr>')
    return ('<section id="runs"><h2>Runs</h2><table class="sortable"><thead><tr><th>run</th><th>started (UTC)</th>'
            '<th class="num">images processed</th><th class="num">images rows now</th><th class="num">images/s</th>'
            '<th>ended</th><th>settings</th></tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table></section>')


def _errors(facts: dict[str, Any]) -> str:
    groups, skipped = facts["errors"], facts["skipped_keys"]
    body = '<p class="muted">Every image was segmented.</p>'
    if groups:
        rows = "".join(f'<tr><td>{esc(g["status"])}</td><td class="num" data-v="{g["count"]}">{g["count"]}</td>'
                       f'<td>{esc(g["reason"])}</td><td>{"<br>".join(f"<code>{esc(u)}</code>" for u in g["examples"])}</td></tr>'
                       for g in groups)
        body = ('<table class="sortable"><thead><tr><th>status</th><th class="num">images</th><th>reason</th>'
                f'<th>examples</th></tr></thead><tbody>{rows}</tbody></table>')
    if skipped:
        items = ", ".join(f"{count('skipped.' + (ext or 'none'), n)} {esc(ext or '(no extension)')}"
                          for ext, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
        body += f'<p>Keys under the input that are not images, skipped: {items}.</p>'
    return f'<section id="errors"><h2>What went wrong</h2>{body}</section>'


def _proposals(facts: dict[str, Any]) -> str:
    plots = [_hist(facts["proposals_per_image"], "proposals per image (ok images)", "per_image"),
             _hist(facts["scores"], f"objectness score of the proposals of {facts['proposal_sample_images']} "
                                    "sampled images", "scores")]
    plots += [_hist(h, f"log10 mask area (px), scale {h['scale']}", f"area_{h['scale']}") for h in facts["area_by_scale"]]
    return f'<section id="proposals"><h2>Proposals</h2><div class="plots">{"".join(plots)}</div></section>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{title}</h2>{body}</section>'


def _empty(sid: str, title: str, text: str) -> str:
    return _section(sid, title, f'<p class="muted">{text}</p>')


def _hist(h: dict[str, Any], title: str, key: str, stats: bool = True) -> str:
    """A histogram as inline SVG bars, with its n, mean and median (`stats`)."""
    if not h["counts"]:
        return f'<div class="plot"><div>{esc(title)}: no data</div></div>'
    top = max(h["counts"]) or 1
    w = PLOT_W / len(h["counts"])
    bars = "".join(f'<rect x="{i * w + 1:.1f}" y="{PLOT_H - 18 - (PLOT_H - 24) * c / top:.1f}" width="{max(w - 2, 1):.1f}" '
                   f'height="{(PLOT_H - 24) * c / top:.1f}" fill="#4c78a8"><title>[{h["edges"][i]:g}, '
                   f'{h["edges"][i + 1]:g}): {c}</title></rect>' for i, c in enumerate(h["counts"]))
    axis = (f'<text x="0" y="{PLOT_H - 4}" font-size="11">{h["edges"][0]:g}</text>'
            f'<text x="{PLOT_W}" y="{PLOT_H - 4}" font-size="11" text-anchor="end">{h["edges"][-1]:g}</text>')
    return (f'<div class="plot" data-hist="{esc(key)}"><div>{esc(title)}</div><svg width="{PLOT_W}" height="{PLOT_H}" '
            f'viewBox="0 0 {PLOT_W} {PLOT_H}" role="img">{bars}{axis}</svg><div>n = {count("hist." + key + ".n", h["n"])}'
            + (f', mean {h["mean"]:.3g}, median {h["median"]:.3g}' if stats else "") + '</div></div>')


def _throughput(points: list[dict[str, Any]]) -> str:
    if not points:
        return _empty("throughput", "Throughput", "No commits recorded.")
    t_max = max(p["t_s"] for p in points) or 1.0
    n_max = max(p["images"] for p in points) or 1
    colors = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2")
    lines = []
    for i, rid in enumerate(dict.fromkeys(p["run_id"] for p in points)):
        pts = [(0.0, 0)] + [(p["t_s"], p["images"]) for p in points if p["run_id"] == rid]
        xy = " ".join(f"{40 + (PLOT_W * 1.5 - 50) * t / t_max:.1f},{PLOT_H - 20 - (PLOT_H - 30) * n / n_max:.1f}"
                      for t, n in pts)
        lines.append(f'<polyline fill="none" stroke="{colors[i % len(colors)]}" stroke-width="2" points="{xy}">'
                     f'<title>run {esc(rid)}</title></polyline>')
    svg = (f'<svg width="{PLOT_W * 1.5:.0f}" height="{PLOT_H}" role="img">{"".join(lines)}'
           f'<text x="40" y="{PLOT_H - 4}" font-size="11">0 s</text><text x="{PLOT_W * 1.5 - 10:.0f}" y="{PLOT_H - 4}" '
           f'font-size="11" text-anchor="end">{t_max:.0f} s</text><text x="0" y="12" font-size="11">{n_max}</text></svg>')
    return (f'<section id="throughput"><h2>Throughput</h2><div class="plot">Images committed over time, per run '
            f'(from the images table\'s commits)</div>{svg}</section>')


def _recall(r: dict[str, Any]) -> str:
    cells = "".join(f'<div class="card"><b>{count("ar." + name, f"{100 * v:.1f}" if v >= 0 else "n/a")}</b>'
                    f'<span>{esc(name)}</span></div>' for name, v in r["ar"].items())
    curve = {"edges": r["iou"] + [1.0], "counts": [round(1000 * max(v, 0)) for v in r["recall"]], "n": r["images"]}
    return (f'<section id="recall"><h2>Average recall against the annotations</h2><p class="muted">Class-agnostic mask '
            f'AR (%), {esc(r["protocol"])}, over {r["images"]} annotated images.</p><div class="cards">{cells}</div>'
            f'{_hist(curve, "recall (per mille) at each IoU threshold, 1000 proposals", "recall_iou", stats=False)}</section>')


def _gallery(items: list[dict[str, Any]]) -> str:
    if not items:
        return _empty("gallery", "Gallery", "No image with proposals.")
    figs = []
    for g in items:
        caption = f'<code>{esc(g["image_id"])}</code>: top {g["drawn"]} of {g["proposals"]} proposals'
        if "error" in g:
            figs.append(f'<figure><figcaption>{caption}<br>could not draw: {esc(g["error"])}</figcaption></figure>')
        else:
            figs.append(f'<figure><img alt="{esc(g["image_id"])}" src="data:image/jpeg;base64,{g["jpeg_b64"]}">'
                        f'<figcaption>{caption}</figcaption></figure>')
    return (f'<section id="gallery"><h2>Gallery ({count("gallery.images", len(items))} sampled images)</h2>'
            f'<div class="gallery">{"".join(figs)}</div></section>')
