"""How close does multi-scale InstanceFCN inference get to the machine's dense matmul rate?

    python bench/model.py [--backbone vgg16|vgg16_narrow] [--size 480x640] [--heads structured|random]

Measures, in one run on one machine:
  - the multi-scale forward's FLOPs, counted from every conv's shapes (2 * MACs) with forward hooks;
  - dense fp32 matmul GFLOP/s (torch.mm of large square matrices): the machine's ceiling;
  - the bare multi-scale forward's GFLOP/s (pre-resized inputs, model(x) per scale);
  - the whole Predictor.predict() (resize, forward, top windows, assemble, paste, binarise,
    box or mask NMS, RLE) as forward FLOPs over its wall time, and postprocess (the CPU half) alone.
and prints the ratios forward/matmul, predict/matmul, predict/forward. Matmul, forward and
predict run in interleaved rounds (one warm-up round, then --repeat) so all see the same load;
each reports its best round, the least disturbed by other processes on a shared machine.

--heads structured (default) keeps the real network's compute but replaces its two head outputs
with the maps a well-trained model would give on the synthetic scene (sharp instance-sensitive
scores, objectness peaks at instance centres of the right size), so pasting and NMS see
realistic near-duplicate masks. --heads random uses the random-init heads as they are (noisy
~0.5 masks, which make NMS artificially cheap or hard depending on the seed).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ifcn import BACKBONES, PAPER_SCALES, InferenceConfig, InstanceFCN, ModelConfig, Predictor, postprocess
from ifcn.ops.transforms import image_to_tensor, normalize, resize, scaled_size

MATMUL_N = 4096  # large enough that torch.mm runs at the BLAS's peak, small enough to take ~1 s on 2 cores
MATMUL_REPS = 3  # products per round: a sample long enough not to land in one lucky quiet moment


def synthetic_scene(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """(H, W, 3) uint8 image of flat-coloured rectangles and ellipses (some touching) on texture,
    and their (H, W) bool instance masks."""
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 80 + 40).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    instances = []
    short = min(height, width)
    for i in range(24):
        size = short * float(np.exp(rng.uniform(np.log(0.06), np.log(0.7))))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = size / 2 * rng.uniform(0.6, 1.0), size / 2 * rng.uniform(0.6, 1.0)
        if i % 2:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        for other in instances:  # later objects occlude earlier ones
            other &= ~mask
        instances.append(mask)
        image[mask] = rng.integers(0, 256, 3)
        if i % 6 == 0:  # a touching twin to the right: one foreground blob, two instances
            twin = np.roll(mask, int(2 * rx), axis=1) & (xx >= cx + rx)
            for other in instances:
                other &= ~twin
            instances.append(twin)
            image[twin] = rng.integers(0, 256, 3)
    return image, [m for m in instances if m.sum() > 16]


class OracleHeads(nn.Module):
    """Runs the real InstanceFCN (same FLOPs), then returns the maps a well-trained model would:
    for each instance, a pixel is positive only in the score map of its cell in the window centred
    on the instance; objectness peaks (with noise) at instance centres whose size fits the window."""

    def __init__(self, model: InstanceFCN, instances: list[np.ndarray], seed: int = 0) -> None:
        super().__init__()
        self.model, self.config = model, model.config
        self.instances = [torch.from_numpy(m) for m in instances]
        self.boxes = []  # (y0, x0, y1, x1) in original pixels, exclusive ends
        for m in instances:
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            self.boxes.append((rows[0], cols[0], rows[-1] + 1, cols[-1] + 1))
        self.seed = seed
        self._maps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, objectness = self.model(images)  # (1, k*k, h, w), (1, 1, h, w)
        key = tuple(images.shape[-2:])
        if key not in self._maps:  # maps depend only on the input size: computed once per scale
            self._maps[key] = self._oracle_maps(images.shape[-2:], scores.shape[-2:])
        ideal, obj = self._maps[key]
        return ideal.to(scores.dtype), obj.to(objectness.dtype)

    def _oracle_maps(self, size: tuple[int, int], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, k*k, h, w) score logits and (1, 1, h, w) objectness logits for an input of `size`."""
        k, m, stride = self.config.k, self.config.m, self.config.stride
        fh, fw = grid
        height, width = self.instances[0].shape
        fy, fx = size[0] / height, size[1] / width  # resized / original
        gen = torch.Generator().manual_seed(self.seed + fh)
        ideal = torch.full((k * k, fh, fw), -6.0)
        obj = torch.rand((fh, fw), generator=gen) * 4.0 - 8.0  # background: low, noisy
        ys = ((torch.arange(fh) * stride + stride / 2) / fy).long().clamp(max=height - 1)  # cell centre -> pixel
        xs = ((torch.arange(fw) * stride + stride / 2) / fx).long().clamp(max=width - 1)
        for inst, (by0, bx0, by1, bx1) in zip(self.instances, self.boxes):
            cells = inst[ys][:, xs]  # (fh, fw) bool: the instance sampled at cell centres
            if not cells.any():
                continue
            cy = (by0 + by1) / 2 * fy / stride  # box centre in feature cells
            cx = (bx0 + bx1) / 2 * fx / stride
            y0, x0 = round(cy) - m // 2, round(cx) - m // 2
            iy, ix = torch.nonzero(cells, as_tuple=True)
            part = ((iy - y0).clamp(0, m - 1) * k // m) * k + (ix - x0).clamp(0, m - 1) * k // m
            ideal[part, iy, ix] = 6.0
            # objectness: the larger side at ~60% of the window (DeepMask's rule), within 2^(+-1/2)
            side = max((by1 - by0) * fy, (bx1 - bx0) * fx)
            fit = abs(np.log2(side / (0.6 * m * stride)))
            if fit < 0.5:
                dy = torch.arange(fh)[:, None] - cy
                dx = torch.arange(fw)[None, :] - cx
                peak = 6.0 - 2.0 * fit - (dy**2 + dx**2) / 2.0
                obj = torch.maximum(obj, peak)
        return ideal[None], obj[None, None]


def conv_flops(model: nn.Module, inputs: list[torch.Tensor]) -> float:
    """2 * multiply-accumulates of every Conv2d over all inputs, read from the layers' shapes."""
    total = 0.0

    def hook(mod: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += 2.0 * out.numel() * (mod.in_channels // mod.groups) * kh * kw

    handles = [mod.register_forward_hook(hook) for mod in model.modules() if isinstance(mod, nn.Conv2d)]
    try:
        with torch.inference_mode():
            for x in inputs:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds over all its threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def best_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    return min(timed(fn)[0] for _ in range(repeat))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", choices=BACKBONES, default="vgg16")
    ap.add_argument("--size", default="480x640", help="image HxW (default 480x640, a typical COCO image)")
    ap.add_argument("--scales", default=",".join(map(str, PAPER_SCALES)), help="short sides (the paper's six)")
    ap.add_argument("--proposals", type=int, default=1000, help="max proposals kept (AR@1000)")
    ap.add_argument("--heads", choices=("structured", "random"), default="structured")
    ap.add_argument("--nms", choices=("box", "mask"), default="box", help="NMS IoU of boxes (the paper's) or masks")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds after one warm-up round")
    ap.add_argument("--compare-nchw", action="store_true",
                    help="also time the bare forward in the default NCHW layout (Predictor uses channels_last)")
    args = ap.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))

    torch.manual_seed(0)
    model = InstanceFCN(ModelConfig(args.backbone)).eval()
    image, instances = synthetic_scene(height, width)
    net: nn.Module = OracleHeads(model, instances) if args.heads == "structured" else model
    config = InferenceConfig(scales=tuple(int(s) for s in args.scales.split(",")), max_proposals=args.proposals,
                             nms=args.nms)
    predictor = Predictor(model, config, device="cpu")
    predictor.model = net  # same compute, chosen heads; Predictor only calls model(x) and model.config

    base = image_to_tensor(image)
    # the bare forward gets the layout Predictor uses (channels_last, set on the model by Predictor)
    inputs = [normalize(resize(base, scaled_size(height, width, s, config.max_size))).contiguous(
        memory_format=torch.channels_last) for s in config.scales]
    flops = conv_flops(model, inputs)

    def forward_all() -> None:
        with torch.inference_mode():
            for x in inputs:
                model(x)

    # Interleaved rounds (matmul, forward, predict) so all three see the same machine load;
    # each keeps its best round. The first round warms up (oneDNN picks kernels per shape).
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    nchw_model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    nchw_inputs = [x.contiguous() for x in inputs]

    def forward_nchw() -> None:
        with torch.inference_mode():
            for x in nchw_inputs:
                nchw_model(x)

    rounds: list[tuple[tuple[float, float], ...]] = []
    nchw_rounds: list[tuple[float, float]] = []
    for _ in range(1 + args.repeat):
        rounds.append((timed(lambda: [torch.mm(a, b) for _ in range(MATMUL_REPS)]), timed(forward_all),
                       timed(lambda: predictor.predict(image))))
        if args.compare_nchw:
            nchw_rounds.append(timed(forward_nchw))
    t_mm, t_forward, t_predict = (min(t[0] for t in col) for col in zip(*rounds[1:]))
    c_mm, c_forward, c_predict = (min(t[1] for t in col) for col in zip(*rounds[1:]))
    mm_flops = 2.0 * MATMUL_N**3 * MATMUL_REPS
    mm = mm_flops / t_mm / 1e9
    cands = predictor.candidates(image)
    t_post = best_time(lambda: postprocess(cands, config), args.repeat)
    proposals = postprocess(cands, config)

    fwd_rate, pred_rate = flops / t_forward / 1e9, flops / t_predict / 1e9
    sizes = [tuple(x.shape[-2:]) for x in inputs]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"python {sys.version.split()[0]}")
    print(f"model: {args.backbone}, heads {args.heads}, image {height}x{width}, scales {list(config.scales)} "
          f"-> inputs {sizes}, {len(instances)} synthetic instances")
    print(f"forward FLOPs (convs, 2*MACs, all scales): {flops / 1e9:.1f} GFLOP")
    print(f"matmul fp32 {MATMUL_REPS}x{MATMUL_N}^2: {t_mm:8.3f} s  {mm:8.1f} GFLOP/s")
    print(f"forward (bare, all scales): {t_forward:8.3f} s  {fwd_rate:8.1f} GFLOP/s")
    print(f"predict (whole):            {t_predict:8.3f} s  {pred_rate:8.1f} GFLOP/s  "
          f"({len(proposals)} proposals from {len(cands.scores)} windows)")
    print(f"  of which postprocess:     {t_post:8.3f} s  (paste, binarise, {args.nms} NMS, RLE; CPU half)")
    print(f"ratios: forward/matmul {fwd_rate / mm:.3f}  predict/matmul {pred_rate / mm:.3f}  "
          f"predict/forward {pred_rate / fwd_rate:.3f}")
    if nchw_rounds:
        t_nchw, c_nchw = min(t[0] for t in nchw_rounds[1:]), min(t[1] for t in nchw_rounds[1:])
        print(f"forward NCHW (for contrast):{t_nchw:8.3f} s  {flops / t_nchw / 1e9:8.1f} GFLOP/s  "
              f"(channels_last / NCHW speed: wall {t_nchw / t_forward:.2f}x, CPU {c_nchw / c_forward:.2f}x)")
    # CPU seconds are what the process got of the cores: on a machine shared with other jobs they
    # track the work done better than wall time does (waiting for a core costs no CPU time).
    print(f"CPU-time ratios (load-robust): forward/matmul {flops / c_forward / (mm_flops / c_mm):.3f}  "
          f"predict/matmul {flops / c_predict / (mm_flops / c_mm):.3f}  predict/forward {c_forward / c_predict:.3f}")
    print("rounds (wall s / CPU s) matmul, forward, predict: "
          + "; ".join(", ".join(f"{w:.2f}/{c:.2f}" for w, c in r) for r in rounds))


if __name__ == "__main__":
    main()
