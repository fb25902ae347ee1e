"""The report's plots as inline SVG drawn by matplotlib: axes, tick labels, units and legends, text
kept as SVG <text> (so a browser test can read the axis labels) and no external font or file.

    svg = histogram_svg(h, xlabel="proposals per image", ylabel="images")   # '<svg ...>...</svg>'
"""
from __future__ import annotations

import io
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

SIZE = (4.6, 2.6)  # inches: one plot
WIDE = (7.2, 3.0)
COLOR = "#4c78a8"
STYLE = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
         "svg.hashsalt": "ifcn-report"}  # text as <text>; a fixed salt: the same facts give the same page


def to_svg(fig: Any) -> str:
    """A figure as one inline <svg> element (no XML prolog or DOCTYPE)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return re.sub(r"^.*?(?=<svg)", "", text, flags=re.S)


def histogram_svg(h: dict[str, Any], xlabel: str, ylabel: str, title: str | None = None,
                  integer: bool = False) -> str:
    """A histogram from its edges and counts (pipeline.report.build.histogram): bars, x and y axes with ticks."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=SIZE)
        edges, counts = h["edges"], h["counts"]
        ax.stairs(counts, edges, fill=True, color=COLOR, alpha=0.85)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if integer:  # whole-number ticks; a narrow range gets room around its few bars
            lo, hi = edges[0] + 0.5, edges[-1] - 0.5
            if hi - lo < 10:
                ax.set_xlim(lo - 3, hi + 3)
                ax.set_xticks(range(int(lo) - 2, int(hi) + 3))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title:
            ax.set_title(title, fontsize=9)
        ax.set_ylim(0, max(counts) * 1.08 if counts and max(counts) else 1)
        return to_svg(fig)


def lines_svg(series: list[dict[str, Any]], xlabel: str, ylabel: str, ylim: tuple[float, float] | None = None,
              wide: bool = True, xlim: tuple[float, float] | None = None) -> str:
    """Lines [{label, x, y, lead?}] with a legend (one entry per line); `lead` is a (x, y) list drawn
    dotted in the line's colour before it (e.g. a run's start-up before its first commit)."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=WIDE if wide else SIZE)
        for s in series:
            line, = ax.plot(s["x"], s["y"], marker="o" if len(s["x"]) < 30 else None, markersize=3, label=s["label"])
            if s.get("lead"):
                ax.plot(*zip(*s["lead"]), linestyle=":", color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlim(*(xlim or (0, None)))
        ax.grid(alpha=0.3)
        if series:
            ax.legend(loc="best", fontsize=8, frameon=False)
        return to_svg(fig)


def gallery_picture(pixels: Any, proposals: list[dict[str, Any]], thumb_px: int,
                    truth: list[Any] | None = None) -> Any:
    """A thumbnail of an image with its proposals (translucent masks and outlines, best drawn last)
    and numbered labels 1..N that do not overlap one another, placed after downscaling so they stay
    readable; ground-truth masks (truth: (H, W) bool arrays) outlined in white over a dark edge."""
    import numpy as np
    from PIL import Image, ImageDraw

    from ifcn.tools.viz import MASK_ALPHA, PALETTE, _font, _outline, decode_rle

    height, width = pixels.shape[:2]
    scale = min(1.0, thumb_px / max(height, width))
    canvas = pixels.astype(np.float32)
    for rank in reversed(range(len(proposals))):
        mask = decode_rle(proposals[rank]["rle"])
        color = np.array(PALETTE[rank % len(PALETTE)], np.float32)
        canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * color
        canvas[_thick(_outline(mask), scale)] = color
    for mask in truth or []:  # white over black: visible on any colour
        edge = _thick(_outline(mask), scale)
        canvas[_thick(edge, scale)] = 0
        canvas[edge] = 255
    picture = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = picture.resize(size, Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(picture)
    font = _font(size[1], size[0])
    placed: list[tuple[float, float, float, float]] = []
    for rank, p in enumerate(proposals):
        label = str(rank + 1)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 4, bottom - top + 4
        x, y, w, h = (float(v) * scale for v in p["bbox"])
        spot = _free_spot([(x, y - th), (x, y), (x + w - tw, y), (x, y + h - th), (x + w - tw, y + h - th),
                           (x + w / 2 - tw / 2, y + h / 2 - th / 2)], tw, th, size, placed)
        if spot is None:
            continue  # no free place: its score is still in the caption
        placed.append((*spot, spot[0] + tw, spot[1] + th))
        color = PALETTE[rank % len(PALETTE)]
        draw.rectangle([spot[0], spot[1], spot[0] + tw - 1, spot[1] + th - 1], fill=color)
        ink = (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 150 else (255, 255, 255)
        draw.text((spot[0] + 2 - left, spot[1] + 2 - top), label, fill=ink, font=font)
    return picture


def _thick(edge: Any, scale: float) -> Any:
    """An outline grown so it is about 1 px wide after downscaling by `scale`."""
    import numpy as np

    out = edge.copy()
    for _ in range(max(0, int(np.ceil(0.5 / max(scale, 1e-6))) - 1)):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _free_spot(candidates: list[tuple[float, float]], w: float, h: float, size: tuple[int, int],
               placed: list[tuple[float, float, float, float]]) -> tuple[float, float] | None:
    """The first candidate top-left corner whose w x h box lies in the image and overlaps no placed box."""
    for x, y in candidates:
        x, y = min(max(0.0, x), size[0] - w), min(max(0.0, y), size[1] - h)
        if all(x + w <= a or x >= c or y + h <= b or y >= d for a, b, c, d in placed):
            return x, y
    return None
