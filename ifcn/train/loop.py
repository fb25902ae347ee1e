"""The training loop, run by every Ray Train worker (DDP, gloo on CPU) or in-process.

    train(config)        Ray Train TorchTrainer with config.num_workers workers (jobs.train calls this)
    train_local(config)  the same loop in this process, one worker (tests, notebooks)

<output>/checkpoint.pt is written every `checkpoint_every` steps (model, optimizer, step, loss
and validation history, training time); a run with the same output resumes from it. The final
model is <output>/model.pt (ifcn.load_checkpoint reads it), the best validated one best.pt;
loss.csv and loss.png hold the loss curve and validation AR. Runs with several workers also write
ranks/rank<r>.json (each rank's images per step and weight digests).

Examples are decoded and augmented ahead of the step by DataLoader workers (ifcn.train.data);
with max_minutes, warm-up and the lr drop follow the time budget (TrainConfig.lr_at).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ifcn.config import ModelConfig
from ifcn.data.coco import CocoDataset
from ifcn.io import filesystem, join, open_url, write_bytes
from ifcn.models import registry as models
from ifcn.models.checkpoint import save_checkpoint
from ifcn.models.instancefcn import load_vgg16_weights

from .config import TrainConfig
from .data import generator as step_generator
from .data import step_loader
from .loss import loss_for
from .sampling import sample_example
from .validate import Validator, is_better

STATE_FORMAT = "instancefcn-train-state/1"
LOG_QUEUE = "_log_queue"  # train_loop_config key of the queue that carries rank 0's lines to the driver
VAL_COLUMNS: tuple[str, ...] = ("AR@10", "AR@100", "AR@1000")  # validation numbers kept per run
Log = Callable[[str], None]


def build_model(config: TrainConfig) -> nn.Module:
    """A fresh model for `config.model` (the registry's entry), trunk optionally from ImageNet VGG-16."""
    model = models.get(config.model).build(ModelConfig(backbone=config.backbone))
    if config.vgg16_weights:
        load_vgg16_weights(model, config.vgg16_weights, config.storage_options)  # every model shares the trunk
    return model


def step_loss(model: nn.Module, config: TrainConfig, example: Any, generator: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one augmented example, as the registry's entry for `config.model` computes it; windowed
    models get the example's sampled windows (the same sampling rules for all of them)."""
    spec = models.get(config.model)
    batch = None
    if spec.windowed:
        mcfg = models.unwrapped(model).config
        batch = sample_example(example, mcfg.m, mcfg.stride, config.windows_per_image, config.positive_fraction,
                               generator)
        batch.cells, batch.labels, batch.targets = (t.to(device) for t in (batch.cells, batch.labels, batch.targets))
    return loss_for(config.model)(model, example, batch, device)


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
               history: list[dict[str, float]], elapsed_s: float = 0.0,
               validation: list[dict[str, float]] | None = None) -> None:
    """<output>/checkpoint.pt; elapsed_s (training time of all runs so far) keeps the time budget across resumes."""
    state = {"format": STATE_FORMAT, "step": step, "config": config.to_dict(), "history": history,
             "elapsed_s": elapsed_s, "validation": validation or [],
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict()}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(join(config.output, "checkpoint.pt"), buf.getvalue(), config.storage_options)


def curve_rows(history: list[dict[str, float]], validation: list[dict[str, float]]) -> tuple[list[str], list[dict]]:
    """Loss rows and validation rows joined on step: columns of both, None where one has no value."""
    loss_cols = list(history[0]) if history else ["step"]
    val_cols = [f"val_{k}" for k in VAL_COLUMNS] if validation else []
    rows: dict[float, dict[str, Any]] = {}
    for r in history:
        rows.setdefault(r["step"], {})["loss"] = r
    for v in validation:
        rows.setdefault(v["step"], {})["val"] = v
    out = []
    for step in sorted(rows):
        loss, val = rows[step].get("loss", {}), rows[step].get("val", {})
        row = {c: loss.get(c) for c in loss_cols}
        row["step"] = step
        row.update({f"val_{k}": val.get(k) for k in VAL_COLUMNS} if validation else {})
        out.append(row)
    return loss_cols + val_cols, out


def write_loss_curve(config: TrainConfig, history: list[dict[str, float]],
                     validation: list[dict[str, float]] | None = None) -> None:
    """<output>/loss.csv and loss.png (matplotlib, Agg backend: no display needed), validation AR beside the loss."""
    validation = validation or []
    if not history and not validation:
        return
    cols, rows = curve_rows(history, validation)
    lines = [",".join(cols)] + [",".join("" if row[c] is None else f"{row[c]:.6g}" for c in cols) for row in rows]
    write_bytes(join(config.output, "loss.csv"), ("\n".join(lines) + "\n").encode(), config.storage_options)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in history]
    for key in ("loss", "objectness", "mask"):
        if history and key in history[0]:
            ax.plot(steps, [r[key] for r in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{config.model} ({config.backbone})")
    handles, labels = ax.get_legend_handles_labels()
    if validation:
        ax2 = ax.twinx()
        ax2.plot([v["step"] for v in validation], [v["AR@100"] for v in validation], "o-", color="black",
                 label="val AR@100")
        ax2.set_ylabel("validation AR@100")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_bytes(join(config.output, "loss.png"), buf.getvalue(), config.storage_options)


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _digests(model: nn.Module) -> dict[str, str]:
    """sha256 of every parameter's bytes: equal digests on two ranks mean bit-identical weights."""
    return {name: hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, p in model.named_parameters()}


def _write_rank_record(config: TrainConfig, rank: int, world: int, start: int, seen: list[list[int]],
                       model: nn.Module) -> None:
    """ranks/rank<r>.json: (step, image id) of every step this run trained on and the final weights' digests."""
    record = {"rank": rank, "world": world, "start": start, "steps": seen, "params_sha256": _digests(model)}
    write_bytes(join(config.output, "ranks", f"rank{rank}.json"), json.dumps(record).encode(), config.storage_options)


def run_loop(config: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
             wrap: Callable[[nn.Module], nn.Module] | None = None, log: Log = print) -> dict[str, Any]:
    """Trains from config.output's checkpoint (or scratch) until steps / max_steps / max_minutes.

    Every rank runs this; only rank 0 writes files, logs and validates. `wrap` turns the model into its
    distributed form (DDP). Returns {"step", "history", "validation", "model_url"}.
    """
    device = torch.device(device)
    torch.manual_seed(config.seed)
    dataset = CocoDataset(config.images, config.annotations, config.storage_options)
    if len(dataset) == 0:
        raise ValueError(f"annotations {config.annotations}: no images to train on")
    model = build_model(config)
    state = load_state(config)
    start, history, validation, base_elapsed = 0, [], [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        start, history = int(state["step"]), list(state["history"])
        validation = list(state.get("validation", []))
        # training time of earlier runs (older checkpoints: their last logged row)
        base_elapsed = float(state.get("elapsed_s", history[-1]["elapsed_s"] if history else 0.0))
    model.to(device).train()
    net = wrap(model) if wrap else model
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)  # no weight decay on biases / BN affine
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=config.lr_at(start, base_elapsed), momentum=config.momentum)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    end = min(config.steps, config.max_steps) if config.max_steps is not None else config.steps
    main = rank == 0
    validator = None
    if main and config.val_images is not None:
        validator = Validator(config.model, config.val_images, config.val_annotations, config.val_max_images,
                              config.scales, device, config.storage_options)
    best = max((v["AR@100"] for v in validation), default=None)
    if main and start:
        log(f"resuming from {join(config.output, 'checkpoint.pt')} at step {start}")
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    budget = 60.0 * config.max_minutes if config.max_minutes is not None else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16")
    loader = step_loader(dataset, start, end, rank, world, config.seed, config.scales, config.max_size, config.flip,
                         config.data_workers, config.prefetch, pin_memory=device.type == "cuda")
    t0 = time.monotonic()
    val_s = 0.0  # this run's time spent validating: not training time, so not in the budget

    def training_time() -> float:
        """Training time of all runs so far, on rank 0's clock (every rank must decide alike)."""
        clock = torch.tensor([base_elapsed + time.monotonic() - t0 - val_s], dtype=torch.float64, device=device)
        if distributed:
            torch.distributed.broadcast(clock, src=0)  # on `device`: NCCL cannot broadcast CPU tensors
        return float(clock.item())

    step, window, seen = start, [], []
    items = iter(loader)
    while step < end:
        elapsed = training_time()
        if budget is not None and elapsed >= budget:
            if main:
                log(f"time limit {config.max_minutes} min reached at step {step}")
            break
        waited = time.monotonic()
        item = next(items)
        waited = time.monotonic() - waited  # the step waiting for its data: ~0 when prefetch keeps up
        if item.step != step:  # the loader yields steps in order; anything else would break resume/DDP
            raise RuntimeError(f"data loader gave step {item.step} at step {step}")
        seen.append([step, item.image_id])
        lr = config.lr_at(step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with amp:
            loss, parts = step_loss(net, config, item.example, step_generator(item), device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        window.append({"loss": float(loss.detach()), **parts, "data_s": waited})
        if step % config.log_every == 0 or step == end:
            now = base_elapsed + time.monotonic() - t0 - val_s
            row = {"step": float(step), **{k: float(np.mean([w[k] for w in window])) for k in window[0]},
                   "lr": lr, "elapsed_s": now}
            history.append(row)
            window = []
            if main:
                rate = (step - start) / max(now - base_elapsed, 1e-9)
                left = (end - step) / rate
                if budget is not None:
                    left = min(left, budget - now)
                parts_s = " ".join(f"{k} {row[k]:.4f}" for k in parts)  # data_s goes to loss.csv only
                log(f"step {step}/{end} loss {row['loss']:.4f} ({parts_s}) lr {lr:.2g} "
                    f"{rate:.2f} it/s ETA {_fmt_time(left)}")
        if validator is not None and (step % config.val_every == 0 or step == end):
            val_s += _validate(config, validator, model, step, validation, best, log)
            best = max(v["AR@100"] for v in validation)
        if main and step % config.checkpoint_every == 0:
            save_state(config, model, optimizer, step, history, base_elapsed + time.monotonic() - t0 - val_s,
                       validation)
            write_loss_curve(config, history, validation)
    del items  # stops the data workers
    elapsed = base_elapsed + time.monotonic() - t0 - val_s
    if validator is not None and step > start and (not validation or validation[-1]["step"] != step):
        val_s += _validate(config, validator, model, step, validation, best, log)  # stopped by time: judge the last
    if world > 1:  # what each rank saw and its final weights: shows DDP kept the ranks in sync on different images
        _write_rank_record(config, rank, world, start, seen, model)
    model_url = join(config.output, "model.pt")
    if main:
        save_state(config, model, optimizer, step, history, elapsed, validation)
        write_loss_curve(config, history, validation)
        save_checkpoint(model.cpu(), model_url, extra={"model": config.model, "step": step,
                                                       "train_config": config.to_dict()},
                        storage_options=config.storage_options)
        log(f"saved {model_url} at step {step}")
    return {"step": step, "history": history, "validation": validation, "model_url": model_url}


def _validate(config: TrainConfig, validator: Validator, model: nn.Module, step: int,
              validation: list[dict[str, float]], best: float | None, log: Log) -> float:
    """One validation (rank 0): appends its row, logs it, writes best.pt when AR@100 improves; returns its seconds."""
    result = validator(model)
    row = {"step": float(step), **{k: result[k] for k in VAL_COLUMNS}}
    validation.append(row)
    improved = is_better(row["AR@100"], best)
    if improved:
        save_checkpoint(model, join(config.output, "best.pt"),
                        extra={"model": config.model, "step": step, "train_config": config.to_dict(),
                               "validation": row}, storage_options=config.storage_options)
    log(f"validation step {step}: AR@10 {row['AR@10']:.3f} AR@100 {row['AR@100']:.3f} on "
        f"{int(result['val_images'])} images ({result['val_s']:.1f} s)"
        + (" best, saved best.pt" if improved else f" (best {best:.3f})" if best is not None else ""))
    return result["val_s"]


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
    lines = config_dict.get(LOG_QUEUE)
    run_loop(config, rank=rank, world=world, device=ray.train.torch.get_device(), wrap=wrap,
             log=lines.put if lines is not None else _worker_log)


def _worker_log(line: str) -> None:
    """Ray Train patches print() into its logger, which echoes each line twice on the driver."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def _relay(lines: Any, log: Log, done: threading.Event) -> None:
    """Driver thread: prints rank 0's lines as they arrive (the workers' own output is not forwarded)."""
    from ray.util.queue import Empty

    while not done.is_set():
        try:
            log(lines.get(timeout=0.5))
        except Empty:
            pass


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
    if config.val_images is not None:
        try:  # the reader's messages name --images/--annotations; say these are the validation ones
            val = CocoDataset(config.val_images, config.val_annotations, config.storage_options)
            if len(val) == 0:
                raise ValueError(f"annotations {config.val_annotations}: no images to validate on")
            val.read_image(0)
        except (OSError, ValueError) as e:
            raise type(e)(f"validation data (--val-images/--val-annotations): {e}") from None


def fit_interruptibly(trainer: Any) -> None:
    """trainer.fit() on a helper thread, so that Ctrl-C raises KeyboardInterrupt in the caller.

    On the main thread Ray Train installs its own SIGINT handler, which aborts the run and exits the
    process with status 1 and no word; the caller's KeyboardInterrupt instead reaches the job's
    one-line message and exit 130, and stopping the driver's Ray (or the driver) ends the run.
    """
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    fitter = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    fitter.start()
    while fitter.is_alive():
        fitter.join(0.5)
    if failure:
        raise failure[0]


def train(config: TrainConfig, log: Log = print) -> str:
    """Trains with Ray Train (TorchTrainer, DDP over config.num_workers workers); returns the model URL.

    Starts a local Ray when none is running and RAY_ADDRESS names no cluster (and stops it after);
    otherwise joins the cluster (RAY_ADDRESS, as under `ray job submit`) or uses the connected Ray.
    Rank 0's progress and validation lines reach `log` through a Ray queue, so a local Ray can keep
    its workers' own output (Ray Train's controller chatter) off the terminal.
    """
    check_inputs(config)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray.util.queue import Empty, Queue

    started = False
    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS", "local") != "local":
        # a cluster (RAY_ADDRESS, `ray job submit`) keeps its own CPUs and dashboard: Ray refuses num_cpus there
        ray.init(log_to_driver=False, logging_level=logging.ERROR)
    elif not ray.is_initialized():
        # The dashboard serves the State API that Ray Train's placement-group cleaner polls every second
        # (without it: "Failed to query Ray Train Controller actor state" each time, and no cleanup).
        ray.init(num_cpus=max(os.cpu_count() or 1, config.num_workers * config.cpus_per_worker),
                 include_dashboard=True, log_to_driver=False, logging_level=logging.ERROR)
        started = True
    lines = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()
    relay = threading.Thread(target=_relay, args=(lines, log, done), daemon=True)
    relay.start()
    try:
        with tempfile.TemporaryDirectory(prefix="ifcn-train-") as tmp:
            trainer = TorchTrainer(
                _ray_worker, train_loop_config={**config.to_dict(), LOG_QUEUE: lines},
                scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                             resources_per_worker={"CPU": config.cpus_per_worker}),
                run_config=RunConfig(name="instancefcn", storage_path=tmp))
            try:
                fit_interruptibly(trainer)
            except Exception as e:  # Ray wraps worker errors with their traceback; keep the last line
                if type(e).__module__.startswith("ray"):
                    lines = [ln for ln in str(e).splitlines() if ln.strip()]
                    raise RuntimeError(f"training failed: {lines[-1] if lines else type(e).__name__}") from e
                raise
    finally:
        done.set()
        relay.join()
        while True:  # what arrived after the relay's last poll
            try:
                log(lines.get_nowait())
            except Empty:
                break
        lines.shutdown()
        if started:
            ray.shutdown()
    return join(config.output, "model.pt")
