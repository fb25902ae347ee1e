"""Multi-scale inference for whole batches of images, with every per-pixel step on the model's device:

    Predictor.windows(images)           every scale's forward (same-size images batched), each image's
                                        top windows across scales, assembled: one WindowBatch, no sync
    Predictor.postprocess_batch(...)    tight boxes, NMS, paste, run lengths for the whole batch
                                        (ifcn.postprocess, torch on the device; or the numpy reference)
    proposals.encode(...)               COCO compressed RLE strings (pycocotools; CPU, after the actor)

On CPU the per-pixel half defaults to the numpy reference (`postprocess_numpy`), which is the
faster of the two there; `postprocess_on="device"` runs the torch path on CPU too (CI does).
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ifcn.batch.containers import Candidates, Groups, Proposals, WindowBatch
from ifcn.batch.hostwork import Host, Steps, drive
from ifcn.batch.postprocessing import postprocess_steps
from ifcn.config import InferenceConfig
from ifcn.floors import require
from ifcn.models import registry as models
from ifcn.models.baseline import BaselinePredictor
from ifcn.models.instancefcn import InstanceFCN
from ifcn.ops.assembling import BACKGROUND_LOGIT, assemble
from ifcn.ops.transforms import Stacks, normalize, resize, scaled_size, stack_images, upload_stacks
from ifcn.ops.upload import upload
from ifcn.tools.opcount import stage

from .proposals import encode, postprocess_numpy

require("torch")  # the APIs used need torch >= FLOORS["torch"]: say so in one line, not deep in a job

# Input pixels per forward: 16 images of 480x640 at the paper's largest scale (900 x 1200 px), whose
# VGG-16 activations take ~7 GB in bf16; larger groups run in several forwards of even size.
BATCH_PIXELS = 18_000_000
POSTPROCESS_ON = ("auto", "device", "numpy")


class Predictor:
    """Runs a trained InstanceFCN on images at every scale of an InferenceConfig (or any windowed
    model of ifcn.models.registry, e.g. DeepMask: forward -> (per-window mask maps, objectness), and
    `window_logits(maps, windows)` -> the windows' (n, m, m) mask logits; for InstanceFCN, assembling).

    amp_dtype: autocast dtype for the forward (torch.bfloat16 on GPUs; None = full precision).
    postprocess_on: "device" (torch ops where the model runs), "numpy" (the reference, on the
    host) or "auto" (device on CUDA, numpy on CPU). compile: torch.compile the model (pays on
    long GPU jobs: its warm-up is tens of seconds per input shape).
    """

    def __init__(self, model: InstanceFCN, config: InferenceConfig = InferenceConfig(),
                 device: str | torch.device | None = None, amp_dtype: torch.dtype | None = None,
                 postprocess_on: str = "auto", compile: bool = False) -> None:
        if postprocess_on not in POSTPROCESS_ON:
            raise ValueError(f"Predictor postprocess_on={postprocess_on!r}: choose one of {POSTPROCESS_ON}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # channels_last: the conv layout oneDNN (CPU) and cuDNN tensor cores run fastest
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.config = config
        self.amp_dtype = amp_dtype
        self.on_device = postprocess_on == "device" or (postprocess_on == "auto" and self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # few distinct input shapes (one per scale and batch)
        self.forward = torch.compile(self.model) if compile else self.model

    def _window_logits(self, maps: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(n, m, m) mask logits of `windows` (n, 3): the model's own `window_logits` (DeepMask), else
        assembling k*k score maps (InstanceFCN, and any model with its forward's outputs)."""
        read = getattr(self.model, "window_logits", None)
        return read(maps, windows) if read is not None else assemble(maps, windows, self.model.config.m)

    @torch.inference_mode()
    def windows(self, images: list[np.ndarray], stacks: Stacks | None = None) -> WindowBatch:
        """images: (H, W, 3) uint8 RGB each -> every image's top windows, on the device, in one padded
        batch (indexing it gives an image's per-scale (Windows, (fy, fx)) groups).

        Windows are ranked across scales: an image keeps its windows_per_scale * len(scales) best
        by objectness wherever they come from, so no window is dropped while a lower-scored one of
        another scale is kept (ties at the cut: any of them). Images whose resized size (padded up
        to `pad_to`) is equal share a forward; padding is set to background before windows are
        picked, so it yields no window and no mask pixel. No host sync. stacks: the images'
        `transforms.stack_images(images, device)` made beforehand (on a thread other than the one
        feeding the device: pipeline/stages/infer.py); None: stacked here."""
        cfg, mcfg = self.config, self.model.config
        total = cfg.windows_per_scale * len(cfg.scales)
        b = len(images)
        hw = [tuple(int(v) for v in image.shape[:2]) for image in images]
        if stacks is None:
            stacks = stack_images(images, self.device)
        bases = upload_stacks(stacks, self.device)  # original size -> ((N, 3, H, W), image indices)
        sizes = [[scaled_size(h, w, short, cfg.max_size) for h, w in hw] for short in cfg.scales]
        # float32-rounded as the numpy path stores them, so both paste the same pixels
        factors = [[(float(np.float32(s[i][0] / hw[i][0])), float(np.float32(s[i][1] / hw[i][1]))) for s in sizes]
                   for i in range(b)]
        table = np.array([[v for f in factors[i] for v in f] + list(cfg.scales) + list(hw[i]) for i in range(b)],
                         dtype=np.float64).reshape(b, -1)  # (B, 2S + S + 2): one host-to-device copy
        info = _to_device(table, self.device)
        n_s = len(cfg.scales)
        logits, cells, chunks = [], [], []  # per scale: (B, T) logits, (B, T, 2) cells; (scale, members, maps)
        for s, short in enumerate(cfg.scales):
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i in range(b):
                groups[_padded(sizes[s][i], cfg.pad_to)].append(i)
            parts = []
            for padded, members in groups.items():
                forwards = math.ceil(len(members) * padded[0] * padded[1] / BATCH_PIXELS)
                per = math.ceil(len(members) / forwards)  # even forwards: fewer shapes for cudnn / compile
                for lo in range(0, len(members), per):
                    chunk = members[lo:lo + per]
                    top = self._top_at_scale(bases, chunk, [sizes[s][i] for i in chunk], padded, total)
                    parts.append((chunk, *top))
                    chunks.append((s, chunk, top[2]))
            lg, cl = _rows(parts, b)
            logits.append(lg)
            cells.append(cl)
        counts = [lg.shape[1] for lg in logits]
        logits_all, cells_all = torch.cat(logits, 1), torch.cat(cells, 1)  # (B, sum T)
        which = torch.cat([torch.full((t,), s, dtype=torch.long, device=self.device) for s, t in enumerate(counts)])
        width = logits_all.shape[1]
        c = min(total, width)
        top = torch.topk(logits_all, c, dim=1)  # the cross-scale cut
        key = torch.sort(top.indices + torch.where(torch.isfinite(top.values), 0, width), dim=1).values
        valid = key < width  # real windows first, in candidate order (scale by scale, best first)
        idx = torch.where(valid, key, key - width)
        logit = logits_all.gather(1, idx)
        cell = cells_all.gather(1, idx[..., None].expand(b, c, 2))
        scale_id = which[idx]  # (B, C)
        m = mcfg.m
        masks = torch.full((b, c, m, m), BACKGROUND_LOGIT, device=self.device)
        for s, members, maps in chunks:
            rows = _to_device(np.asarray(members), self.device) if len(members) < b else None
            cl = cell if rows is None else cell[rows]
            n = cl.shape[0]
            img = torch.arange(n, device=self.device)[:, None, None].expand(n, c, 1)
            windows = torch.cat([img, cl], 2).reshape(-1, 3)  # (n * C, 3)
            here = (scale_id if rows is None else scale_id[rows]) == s  # (n, C)
            if self.device.type == "cpu" and not self.on_device:
                # the numpy path on the host, where syncs are free: assemble only this scale's windows
                at = torch.nonzero(here.reshape(-1)).reshape(-1)
                mine = masks if rows is None else masks[rows]
                mine.view(-1, m, m)[at] = self._window_logits(maps, windows[at])
                if rows is not None:
                    masks[rows] = mine
                continue
            # on a device: every window from every scale's maps, kept where it belongs (no sync)
            got = self._window_logits(maps, windows).reshape(n, c, m, m)
            if rows is None:
                masks = torch.where(here[..., None, None], got, masks)
            else:
                masks[rows] = torch.where(here[..., None, None], got, masks[rows])
        fac = info[:, :2 * n_s].reshape(b, n_s, 2).gather(1, scale_id[..., None].expand(b, c, 2))
        shorts = info[:, 2 * n_s:3 * n_s].long().gather(1, scale_id)
        return WindowBatch(torch.sigmoid(logit), valid, cell, torch.sigmoid(masks), fac, shorts,
                           info[:, 3 * n_s:].long(), hw, [list(zip(cfg.scales, f)) for f in factors])

    def _top_at_scale(self, bases: dict[tuple[int, int], tuple[torch.Tensor, list[int]]], members: list[int],
                      sizes: list[tuple[int, int]], padded: tuple[int, int], total: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched forward at one scale -> images' best `total` windows there: logits (b, T)
        (-inf past an image's own windows), top-left cells (b, T, 2), and the maps the windows read
        (b, k*k, fh, fw) score maps, or DeepMask's (b, m*m, fh, fw) mask maps. No host sync."""
        mcfg = self.model.config
        half, stride = mcfg.m // 2, mcfg.stride
        x = _inputs(bases, members, sizes, padded).contiguous(memory_format=torch.channels_last)  # (b, 3, h, w)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext())
        with amp:
            scores, objectness = self.forward(x)  # (b, k*k, fh, fw), (b, 1, fh, fw)
        scores, objectness = scores.float(), objectness.float()
        batch, _, fh, fw = objectness.shape
        feats = [(math.ceil(s[0] / stride), math.ceil(s[1] / stride)) for s in sizes]  # each image's own map
        if any(f != (fh, fw) for f in feats):  # padding: background scores, never a window
            inside = torch.zeros((batch, 1, fh, fw), dtype=torch.bool, device=self.device)
            for j, (h, w) in enumerate(feats):
                inside[j, :, :h, :w] = True
            scores = scores.masked_fill(~inside, BACKGROUND_LOGIT)
            objectness = objectness.masked_fill(~inside, -math.inf)
        top = torch.topk(objectness.reshape(batch, -1), min(total, fh * fw), dim=1)  # (b, T)
        cells = torch.stack([top.indices // fw - half, top.indices % fw - half], dim=2)  # (b, T, 2) top-left cells
        return top.values, cells, scores

    def postprocess_batch(self, windows_per_image: WindowBatch | list[Groups],
                          image_sizes: list[tuple[int, int]]) -> list[Proposals]:
        """Every image's proposals (compact form, best first) from `windows` (a WindowBatch, or per
        image its groups): one batched chain on the device, or the numpy reference image by image."""
        return drive(self.postprocess_steps(windows_per_image, image_sizes))

    @torch.inference_mode()
    def postprocess_steps(self, windows_per_image: WindowBatch | list[Groups],
                          image_sizes: list[tuple[int, int]]) -> Steps[list[Proposals]]:
        """postprocess_batch as a device routine (ifcn.batch.hostwork): its host work (the device path's
        planning, or the whole numpy reference after one read of the windows) is yielded, so the actor
        runs it on its calling thread while the device thread only feeds the device."""
        mcfg = self.model.config
        batch = windows_per_image
        if not isinstance(batch, WindowBatch):
            groups = [[(w, f) for w, f in g if len(w)] for g in windows_per_image]
            if not any(groups):
                return [Proposals.empty(s) for s in image_sizes]
            batch = WindowBatch.from_groups(groups, image_sizes)
        if self.on_device:
            return (yield from postprocess_steps(batch, self.config, mcfg.m, mcfg.stride))
        candidates = batch.candidates(mcfg.stride)  # the read of every window (on the device's thread)
        return (yield Host(_postprocess_numpy, candidates, self.config))

    def postprocess(self, groups: Groups, image_size: tuple[int, int]) -> Proposals:
        """One image's windows (an item of `windows`) -> its proposals, on the device or with numpy."""
        return self.postprocess_batch([groups], [image_size])[0]

    def proposals(self, images: list[np.ndarray]) -> list[Proposals]:
        """images: (H, W, 3) uint8 RGB each -> each image's proposals, best first (compact form)."""
        with stage("windows"):  # upload, forwards and assembling (opcount's bytes by stage)
            batch = self.windows(images)
        return self.postprocess_batch(batch, [image.shape[:2] for image in images])

    def candidates(self, image: np.ndarray) -> Candidates:
        """image: (H, W, 3) uint8 RGB -> top windows of every scale, on the host."""
        return self.windows([image]).candidates(self.model.config.stride)[0]

    def predict(self, image: np.ndarray) -> list[dict[str, Any]]:
        """image: (H, W, 3) uint8 RGB -> proposals best first (see `postprocess`)."""
        return encode(self.proposals([image])[0])


def _postprocess_numpy(candidates: list[Candidates], config: InferenceConfig) -> list[Proposals]:
    """The numpy reference, image by image (host work)."""
    return [postprocess_numpy(c, config) for c in candidates]


def _to_device(table: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host table on the device; on CUDA from pinned memory without waiting for the queue."""
    return upload(table, device)


def _inputs(bases: dict[tuple[int, int], tuple[torch.Tensor, list[int]]], members: list[int],
            sizes: list[tuple[int, int]], padded: tuple[int, int]) -> torch.Tensor:
    """(b, 3, h, w) network input of images `members` (resized to `sizes`, padded to `padded`): one
    resize per original size among them."""
    out = []
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for j, i in enumerate(members):
        for shape, (t, idx) in bases.items():
            if i in idx:
                by_size[shape].append(j)
    order = []
    for shape, js in by_size.items():
        t, idx = bases[shape]
        rows = [idx.index(members[j]) for j in js]
        part = t if rows == list(range(len(idx))) else t[_to_device(np.asarray(rows), t.device)]
        size = sizes[js[0]]
        out.append(F.pad(normalize(resize(part, size)), (0, padded[1] - size[1], 0, padded[0] - size[0])))
        order += js
    x = torch.cat(out) if len(out) > 1 else out[0]
    return x if order == sorted(order) else x[_to_device(np.argsort(order), x.device)]


def _rows(parts: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]], b: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk (members, logits (b_c, T_c), cells (b_c, T_c, 2), maps) -> (B, T) logits (-inf
    padding) and (B, T, 2) cells in image order."""
    if len(parts) == 1 and parts[0][0] == list(range(b)):
        return parts[0][1], parts[0][2]
    t = max(p[1].shape[1] for p in parts)
    dev = parts[0][1].device
    logits = torch.full((b, t), -math.inf, device=dev)
    cells = torch.zeros((b, t, 2), dtype=torch.long, device=dev)
    for members, lg, cl, _ in parts:
        rows = _to_device(np.asarray(members), dev)
        logits[rows, :lg.shape[1]] = lg
        cells[rows, :cl.shape[1]] = cl
    return logits, cells


def _padded(size: tuple[int, int], pad_to: int) -> tuple[int, int]:
    if not pad_to:
        return size
    return (-(-size[0] // pad_to) * pad_to, -(-size[1] // pad_to) * pad_to)


def predictor_for(model: torch.nn.Module, config: InferenceConfig = InferenceConfig(),
                  device: str | torch.device | None = None) -> Any:
    """What runs a registered model over images (`.predict(image (H, W, 3) uint8)` -> proposals best
    first): this module's Predictor for the windowed models (InstanceFCN, DeepMask); connected
    components of the foreground map for the FCN baseline (CPU)."""
    if models.get(models.kind_of(model)).windowed:
        return Predictor(model, config, device=device)
    return BaselinePredictor(model, config)
