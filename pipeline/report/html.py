"""The run report as one self-contained HTML page: CSS, SVG plots and JPEG thumbnails inline, no
network, no server; it opens from a bucket or a laptop. Facts come from pipeline.report.build.collect.

Every number a test checks carries `data-count="<name>"`, so a browser test can read the rendered
page and compare it with counts computed from the tables directly.
"""
from __future__ import annotations

import html
import time
from typing import Any

from .plots import histogram_svg, lines_svg

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
.plots{display:flex;flex-wrap:wrap;gap:18px}.plot{font-size:12px;color:#57606a}.plot svg{max-width:100%;height:auto}
table.kv{width:auto}table.kv td:first-child{color:#57606a;white-space:nowrap}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
ol.scores{margin:2px 0 0;padding-left:22px;columns:2}
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
    """facts (pipeline.report.build.collect) -> the whole page."""
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
        rate = "" if r.get("images_per_s") is None else f"{r['images_per_s']:.2f}"
        rows.append(f'<tr><td><code>{esc(r["run_id"])}</code></td><td>{when}</td>'
                    f'<td class="num" data-v="{r["images"]}">{count("run." + r["run_id"] + ".images", r["images"])}</td>'
                    f'<td class="num" data-v="{r["rows_in_table"]}">'
                    f'{count("run." + r["run_id"] + ".rows", r["rows_in_table"])}</td>'
                    f'<td class="num">{rate}</td><td>{"complete" if r["complete"] else "incomplete"}: '
                    f'{esc(r.get("ended"))}</td></tr>')
    table = ('<table class="sortable"><thead><tr><th>run</th><th>started (UTC)</th>'
             '<th class="num">images processed</th><th class="num">images rows now</th>'
             '<th class="num">images/s (start to last commit)</th><th>ended</th></tr>'
             f'</thead><tbody>{"".join(rows)}</tbody></table>')
    latest = runs[-1]
    return (f'<section id="runs"><h2>Runs</h2>{table}<h3>Latest run: {esc(latest["run_id"])}</h3>'
            f'<div class="plots">{_kv("settings", "Settings", _flat(latest.get("settings") or {}))}'
            f'{_kv("setup", "Model and cluster", _setup(latest))}</div></section>')


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested settings as (dotted name, value) rows, lists comma-separated."""
    out: list[tuple[str, Any]] = []
    for k, v in sorted(d.items()):
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", ",".join(map(str, v)) if isinstance(v, list) else v))
    return out


def _setup(r: dict[str, Any]) -> list[tuple[str, Any]]:
    info, res, v = r.get("checkpoint_info") or {}, r.get("resources") or {}, r.get("versions") or {}
    sha = r.get("checkpoint_sha256") or "unknown"
    rows = [("checkpoint", r.get("checkpoint") or "unknown"), ("checkpoint sha256", sha),
            ("model kind", info.get("kind", "unknown (checkpoint not readable now)")),
            ("backbone", info.get("backbone", "unknown")),
            ("trained at scales", ",".join(map(str, info.get("trained_scales") or [])) or "unknown")]
    if res:
        rows += [("cluster", f"{res.get('nodes')} node(s), {res.get('cluster_cpus'):g} CPU, {res.get('cluster_gpus'):g} GPU"),
                 ("inference actors", f"{res.get('actors')} x ({res.get('gpus_per_actor'):g} GPU, "
                                      f"{res.get('cpus_per_actor'):g} CPU), batch {res.get('batch_size')}"),
                 ("RLE strings made in", res.get("postprocess"))]
    else:
        rows.append(("cluster, actors", "not recorded (a run before they were recorded)"))
    rows += [(f"{name} version", v[name]) for name in ("ray", "torch", "pyarrow", "deltalake", "python", "ifcn")
             if name in v]
    return rows


def _kv(sid: str, title: str, rows: list[tuple[str, Any]]) -> str:
    body = "".join(f'<tr><td>{esc(k)}</td><td><code>{esc(v)}</code></td></tr>' for k, v in rows)
    return f'<div class="plot" id="{sid}"><div>{esc(title)}</div><table class="kv"><tbody>{body}</tbody></table></div>'


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
    n = facts["proposal_sample_images"]
    plots = [_hist(facts["proposals_per_image"], "proposals per image (ok images)", "per_image",
                   "proposals kept per image", "images", integer=True),
             _hist(facts["scores"], f"objectness scores (proposals of {n} sampled images)", "scores",
                   "objectness score (probability)", "proposals")]
    plots += [_hist(h, f"mask area at scale {h['scale']} px (proposals of {n} sampled images)", f"area_{h['scale']}",
                    "log10 of mask area (px)", "proposals") for h in facts["area_by_scale"]]
    return f'<section id="proposals"><h2>Proposals</h2><div class="plots">{"".join(plots)}</div></section>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{title}</h2>{body}</section>'


def _empty(sid: str, title: str, text: str) -> str:
    return _section(sid, title, f'<p class="muted">{text}</p>')


def _hist(h: dict[str, Any], title: str, key: str, xlabel: str, ylabel: str, integer: bool = False) -> str:
    """A histogram (matplotlib SVG) with its n, mean and median."""
    if not h["counts"]:
        return f'<div class="plot" data-hist="{esc(key)}"><div>{esc(title)}: no data</div></div>'
    return (f'<div class="plot" data-hist="{esc(key)}"><div>{esc(title)}</div>'
            f'{histogram_svg(h, xlabel, ylabel, integer=integer)}<div>n = {count("hist." + key + ".n", h["n"])}, '
            f'mean {h["mean"]:.3g}, median {h["median"]:.3g}</div></div>')


def _throughput(points: list[dict[str, Any]]) -> str:
    """Images committed against time, one line per run from its first commit (start-up, listing and
    model loading happen before it and are said in the legend) to its last."""
    if not points:
        return _empty("throughput", "Throughput", "No commits recorded.")
    series = []
    for rid in dict.fromkeys(p["run_id"] for p in points):
        mine = [p for p in points if p["run_id"] == rid]
        x, y = [p["t_s"] for p in mine], [p["images"] for p in mine]
        rate = (y[-1] - y[0]) / (x[-1] - x[0]) if x[-1] > x[0] else None
        label = (f"run {rid}: {y[-1]} images; first commit at {x[0]:.0f} s"
                 + (f", then {rate:.2f} images/s" if rate else ""))
        series.append({"label": label, "x": x, "y": y, "lead": [(0, 0), (x[0], y[0])]})
    return (f'<section id="throughput"><h2>Throughput</h2><div class="plot">Images committed per run (solid: from '
            f'its first commit to its last; dotted: start-up, listing, model loading and the first images before '
            f'the first commit), from the table\'s commits</div>'
            f'{lines_svg(series, "seconds since the run started (s)", "images committed")}</section>')


def _recall(r: dict[str, Any]) -> str:
    cells = "".join(f'<div class="card"><b>{count("ar." + name, f"{100 * v:.1f}" if v >= 0 else "n/a")}</b>'
                    f'<span>{esc(name)}</span></div>' for name, v in r["ar"].items())
    kept = r.get("kept")
    dets = sorted(d for d in r["curves"] if kept is None or d <= kept) or [min(r["curves"])]
    if kept and kept not in dets and kept < max(r["curves"]):
        dets.append(max(r["curves"]))  # the run's cap lies between COCOeval's counts: its full curve
    series = [{"label": f"{min(d, kept or d)} proposals", "x": r["iou"], "y": [max(v, 0) for v in r["curves"][d]]}
              for d in dets]
    curve = lines_svg(series, "IoU threshold", "recall (share of ground-truth objects)", (0, 1), wide=False,
                      xlim=(min(r["iou"]) - 0.02, max(r["iou"]) + 0.02))
    note = f" The run kept {kept} proposals per image, so AR@k is shown for k up to {kept}." if kept else ""
    return (f'<section id="recall"><h2>Average recall against the annotations</h2><p class="muted">Class-agnostic mask '
            f'AR (%), {esc(r["protocol"])}, over {r["images"]} annotated images.{note}</p><div class="cards">{cells}</div>'
            f'<div class="plot" data-plot="recall_iou">'
            f'{curve}'
            f'</div></section>')


def _gallery(items: list[dict[str, Any]]) -> str:
    if not items:
        return _empty("gallery", "Gallery", "No image with proposals.")
    figs = []
    for g in items:
        caption = f'<code>{esc(g["image_id"])}</code>: best {g["drawn"]} of {g["proposals"]} proposals'
        if g.get("truth") is not None:
            caption += f', {count("truth." + g["image_id"], g["truth"])} ground-truth object(s) outlined in white'
        scores = "".join(f"<li>{s:.4g}</li>" for s in g.get("scores", []))
        caption += f'<ol class="scores" title="objectness score of each numbered proposal">{scores}</ol>'
        if "error" in g:
            figs.append(f'<figure><figcaption>{caption}<br>could not draw: {esc(g["error"])}</figcaption></figure>')
        else:
            figs.append(f'<figure><img alt="{esc(g["image_id"])}" src="data:image/jpeg;base64,{g["jpeg_b64"]}">'
                        f'<figcaption>{caption}</figcaption></figure>')
    return (f'<section id="gallery"><h2>Gallery ({count("gallery.images", len(items))} sampled images; labels number '
            f'the proposals best first, their scores below each picture)</h2>'
            f'<div class="gallery">{"".join(figs)}</div></section>')
