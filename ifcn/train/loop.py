"""The training loop, run by every Ray Train worker (DDP, gloo on CPU) or in-process.

    train(config)        Ray Train TorchTrainer with config.num_workers workers (jobs.train calls this)
    train_local(config)  the same loop in this process, one worker (tests, notebooks)

<output>/checkpoint.pt is written every `checkpoint_every` steps (model, optimizer, step, loss
history); a run with the same output resumes from it. The final model is <output>/model.pt
(ifcn.load_checkpoint reads it); loss.csv and loss.png hold the loss curve.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..checkpoint import save_checkpoint
from ..config import ModelConfig
from ..data.coco import CocoDataset
from ..io import filesystem, join, open_url, write_bytes
from ..model import InstanceFCN, load_vgg16_weights
from .config import TrainConfig
from .loss import instance_fcn_loss
from .sampling import augment, sample_example

STATE_FORMAT = "instancefcn-train-state/1"
Log = Callable[[str], None]


def build_model(config: TrainConfig) -> nn.Module:
    """A fresh model for `config.model`, trunk optionally initialised from ImageNet VGG-16."""
    mcfg = ModelConfig(backbone=config.backbone)
    if config.model == "fcn-baseline":
        from ..baseline import FCNBaseline  # the baseline reuses this loop; imported lazily (no cycle)

        model: nn.Module = FCNBaseline(mcfg)
    else:
        model = InstanceFCN(mcfg)
    if config.vgg16_weights:
        load_vgg16_weights(model, config.vgg16_weights, config.storage_options)  # both models share the trunk
    return model


def step_loss(model: nn.Module, config: TrainConfig, example: Any, generator: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one augmented example for either model."""
    core = model.module if hasattr(model, "module") else model
    mcfg = core.config
    if config.model == "fcn-baseline":
        from ..baseline import baseline_loss

        return baseline_loss(model(example.image.to(device)), example)
    batch = sample_example(example, mcfg.m, mcfg.stride, config.windows_per_image, config.positive_fraction,
                           generator)
    batch.cells, batch.labels, batch.targets = (t.to(device) for t in (batch.cells, batch.labels, batch.targets))
    scores, objectness = model(example.image.to(device))
    return instance_fcn_loss(scores, objectness, batch, mcfg.m)


def image_index(step: int, rank: int, world: int, num_images: int, seed: int) -> int:
    """Image for (step, rank): epochs of per-epoch permutations, workers interleaved, resumable."""
    g = step * world + rank
    epoch, pos = divmod(g, num_images)
    return int(np.random.default_rng([seed, epoch]).permutation(num_images)[pos])


def load_state(config: TrainConfig) -> dict[str, Any] | None:
    """The resumable state in config.output, or None for a fresh run."""
    url = join(config.output, "checkpoint.pt")
    fs, path = filesystem(url, config.storage_options)
    if not fs.exists(path):
        return None
    with open_url(url, "rb", config.storage_options) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{url}: not a training checkpoint; use a new --output or delete it")
    was = TrainConfig.from_dict(state["config"])
    if (was.model, was.backbone) != (config.model, config.backbone):
        raise ValueError(f"{url} was trained as model={was.model!r} backbone={was.backbone!r}, not "
                         f"model={config.model!r} backbone={config.backbone!r}; use another --output")
    return state


def save_state(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
               history: list[dict[str, float]]) -> None:
    state = {"format": STATE_FORMAT, "step": step, "config": config.to_dict(), "history": history,
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict()}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(join(config.output, "checkpoint.pt"), buf.getvalue(), config.storage_options)


def write_loss_curve(config: TrainConfig, history: list[dict[str, float]]) -> None:
    """<output>/loss.csv and loss.png (matplotlib, Agg backend: no display needed)."""
    if not history:
        return
    cols = list(history[0])
    lines = [",".join(cols)] + [",".join(f"{row[c]:.6g}" for c in cols) for row in history]
    write_bytes(join(config.output, "loss.csv"), ("\n".join(lines) + "\n").encode(), config.storage_options)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in history]
    for key in ("loss", "objectness", "mask"):
        if key in history[0]:
            ax.plot(steps, [r[key] for r in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{config.model} ({config.backbone})")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_bytes(join(config.output, "loss.png"), buf.getvalue(), config.storage_options)


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def run_loop(config: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
             wrap: Callable[[nn.Module], nn.Module] | None = None, log: Log = print) -> dict[str, Any]:
    """Trains from config.output's checkpoint (or scratch) until steps / max_steps / max_minutes.

    Every rank runs this; only rank 0 writes files and logs. `wrap` turns the model into its
    distributed form (DDP). Returns {"step", "history", "model_url"}.
    """
    device = torch.device(device)
    torch.manual_seed(config.seed)
    dataset = CocoDataset(config.images, config.annotations, config.storage_options)
    if len(dataset) == 0:
        raise ValueError(f"annotations {config.annotations}: no images to train on")
    model = build_model(config)
    state = load_state(config)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        start, history = int(state["step"]), list(state["history"])
    model.to(device).train()
    net = wrap(model) if wrap else model
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)  # no weight decay on biases / BN affine
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=config.lr_at(start), momentum=config.momentum)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    end = min(config.steps, config.max_steps) if config.max_steps is not None else config.steps
    main = rank == 0
    if main and start:
        log(f"resuming from {join(config.output, 'checkpoint.pt')} at step {start}")
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    t0 = time.monotonic()
    base_elapsed = history[-1]["elapsed_s"] if history else 0.0  # training time of earlier runs
    step, window = start, []
    while step < end:
        elapsed = time.monotonic() - t0
        # on `device`: NCCL (GPU DDP) cannot all-reduce CPU tensors
        stop = torch.tensor([float(config.max_minutes is not None and elapsed >= 60 * config.max_minutes)], device=device)
        if distributed:
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)  # all ranks stop together
        if stop.item():
            if main:
                log(f"time limit {config.max_minutes} min reached at step {step}")
            break
        rng = np.random.default_rng([config.seed, step, rank])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        sample = dataset[image_index(step, rank, world, len(dataset), config.seed)]
        example = augment(sample.image, sample.masks, sample.boxes, sample.iscrowd, rng, config.scales,
                          config.max_size, config.flip)
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, parts = step_loss(net, config, example, generator, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        window.append({"loss": float(loss.detach()), **parts})
        if step % config.log_every == 0 or step == end:
            row = {"step": float(step), **{k: float(np.mean([w[k] for w in window])) for k in window[0]},
                   "lr": lr, "elapsed_s": base_elapsed + time.monotonic() - t0}
            history.append(row)
            window = []
            if main:
                rate = (step - start) / max(time.monotonic() - t0, 1e-9)
                left = (end - step) / rate
                if config.max_minutes is not None:
                    left = min(left, 60 * config.max_minutes - (time.monotonic() - t0))
                parts_s = " ".join(f"{k} {row[k]:.4f}" for k in parts)
                log(f"step {step}/{end} loss {row['loss']:.4f} ({parts_s}) lr {lr:.2g} "
                    f"{rate:.2f} it/s ETA {_fmt_time(left)}")
        if main and step % config.checkpoint_every == 0:
            save_state(config, model, optimizer, step, history)
            write_loss_curve(config, history)
    model_url = join(config.output, "model.pt")
    if main:
        save_state(config, model, optimizer, step, history)
        write_loss_curve(config, history)
        save_checkpoint(model.cpu(), model_url, extra={"model": config.model, "step": step,
                                                       "train_config": config.to_dict()},
                        storage_options=config.storage_options)
        log(f"saved {model_url} at step {step}")
    return {"step": step, "history": history, "model_url": model_url}


def train_local(config: TrainConfig, log: Log = print) -> dict[str, Any]:
    """One in-process worker, no Ray: same loop, same files."""
    torch.set_num_threads(config.cpus_per_worker)
    device = "cuda" if config.use_gpu and torch.cuda.is_available() else "cpu"
    return run_loop(config, device=device, log=log)


def _ray_worker(config_dict: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(config_dict)
    torch.set_num_threads(config.cpus_per_worker)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if world > 1 else None
    run_loop(config, rank=rank, world=world, device=ray.train.torch.get_device(), wrap=wrap, log=_worker_log)


def _worker_log(line: str) -> None:
    """Ray Train patches print() into its logger, which echoes each line twice on the driver."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def check_inputs(config: TrainConfig) -> None:
    """Fails fast on the driver (missing files, wrong --images root) before any worker starts."""
    dataset = CocoDataset(config.images, config.annotations, config.storage_options)
    if len(dataset) == 0:
        raise ValueError(f"annotations {config.annotations}: no images to train on")
    dataset[0]
    if config.vgg16_weights:
        fs, path = filesystem(config.vgg16_weights, config.storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"--vgg16-weights {config.vgg16_weights}: no such file")


def train(config: TrainConfig, log: Log = print) -> str:
    """Trains with Ray Train (TorchTrainer, DDP over config.num_workers workers); returns the model URL.

    Starts a local Ray when none is running (and stops it after); otherwise uses the connected one.
    """
    check_inputs(config)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(os.cpu_count() or 1, config.num_workers * config.cpus_per_worker),
                 include_dashboard=False, log_to_driver=True)
        started = True
    try:
        with tempfile.TemporaryDirectory(prefix="ifcn-train-") as tmp:
            trainer = TorchTrainer(
                _ray_worker, train_loop_config=config.to_dict(),
                scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                             resources_per_worker={"CPU": config.cpus_per_worker}),
                run_config=RunConfig(name="instancefcn", storage_path=tmp))
            try:
                trainer.fit()
            except Exception as e:  # Ray wraps worker errors with their traceback; keep the last line
                if type(e).__module__.startswith("ray"):
                    lines = [ln for ln in str(e).splitlines() if ln.strip()]
                    raise RuntimeError(f"training failed: {lines[-1] if lines else type(e).__name__}") from e
                raise
    finally:
        if started:
            ray.shutdown()
    return join(config.output, "model.pt")
