"""The Ray Data graph of a run and what it runs on: resources from the cluster and the flags (actors,
GPUs, batch sizes, where RLE strings are made), read blocks sized for throughput, the graph itself
(read tasks -> inference actors -> encoding tasks) and the CPU actors' spread over nodes.
Built by the driver (pipeline/run.py); imports no torch (the actors are named, not imported).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.planning.plan import Plan
from pipeline.stages.read import read_images

from .config import CONCURRENT_CALLS, SegmentConfig, SegmentError

# Images per read task (input block): READ_BATCH to READ_BLOCK_MAX, as many as still leave BLOCKS_PER_ACTOR
# blocks per inference actor (`read_block_rows`), so the executor handles ~8 read tasks per thousand
# images on a GPU node, not 250 (each task costs the driver's executor loop ~2 ms of CPU and the raylet
# more: bench/cpu_side.py). A read task decodes its block in one call (up to READ_BLOCK_MAX images): its
# output is then one Arrow chunk, which Ray Data slices into actor batches without a copy (a block of
# several chunks is combined, i.e. every image's pixels copied, before it is split).
READ_BATCH = 32
READ_BLOCK_MAX = 128
BLOCKS_PER_ACTOR = 4  # small jobs keep every CPU actor fed
# Images per encoding task: None = each block the actors emit as it is (~90 480x640 images of 1000
# proposals, 128 small ones). A batch size that splits those multi-chunk blocks made Ray Data copy
# them whole (~1.4 MB of runs per image) and cost ~2-3 core-ms per image more (bench/cpu_side.py).
ENCODE_BATCH = None
ENCODE_CPUS = 1.0  # an encoding task is pure CPU work
GPU_BATCH = 16  # images per GPU actor call: the H100 forward ran 166 images/s at batch 16, 158 at 8
CPU_BATCH = 4  # images per CPU actor call: one image is already seconds of work
READ_CPUS = 0.5  # reading is half waiting on storage, so two read tasks share a core
MIN_ACTOR_CPUS = 0.25  # a CPU actor's smallest logical share (torch still uses its threads)
MAX_INPUT_BLOCKS = 2000  # listing blocks: enough parallelism, few enough objects for millions of inputs
SPREAD_WAIT_S = 60.0  # how long the CPU actors' placement group may take before the job goes without it


@dataclass(frozen=True)
class Resources:
    """How the inference stage is spread over the cluster (decided once, logged, put in the manifest)."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    postprocess_in_actor: bool  # RLE strings and rows made inside the actors instead of CPU tasks
    batch_size: int = CPU_BATCH  # images per actor call


def resolve_resources(config: SegmentConfig, cluster: dict[str, float],
                      node_cpus: list[float] | None = None) -> Resources:
    """One GPU actor per GPU with encoding tasks behind them; without GPUs, one CPU actor per core
    that also encodes (a CPU actor would otherwise idle a core while tasks queue).

    node_cpus: CPUs of each alive node. A CPU actor never takes so much of its node that a read
    task cannot start beside it: on 1-CPU nodes, actors of 0.75 CPU would leave every node 0.25
    free and the job would wait forever for a read task's 0.5 (a two-node test found it).
    On an autoscaling cluster whose GPU workers are not up yet, pass --gpus-per-actor and --actors.
    """
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    in_actor = config.postprocess == "actor" or (config.postprocess == "auto" and per_actor == 0)
    if config.actors is not None:
        actors = config.actors
    elif per_actor > 0:
        actors = max(1, int(gpus // per_actor))
    elif in_actor:
        actors = max(1, int(cpus))  # each actor runs the whole predict(): one per core
    else:
        actors = max(1, int(cpus // 2))  # leave half the CPUs to read and reduce tasks
    cpus_per_actor = 1.0
    if per_actor == 0:
        # Logical CPUs: leave room for one read task (and, with tasks, one encoding task) beside a
        # pool that fills every core, or the pool would hold all CPUs and the job would wait forever
        # (2 actors of 1 CPU with --postprocess tasks on 2 cores did: nothing was ever read).
        reserve = READ_CPUS + (0.0 if in_actor else ENCODE_CPUS)
        cpus_per_actor = max(MIN_ACTOR_CPUS, min(1.0, (cpus - reserve) / actors,
                                                 min(node_cpus or [cpus]) - READ_CPUS))
        if actors * cpus_per_actor + reserve > cpus:
            raise SegmentError(f"--actors {actors} CPU actors with --postprocess {'actor' if in_actor else 'tasks'} "
                               f"need {actors * MIN_ACTOR_CPUS + reserve:g} CPUs (with a read"
                               f"{'' if in_actor else ' and an encoding'} task), the cluster has {cpus:g}; "
                               f"use fewer --actors" + ("" if in_actor else " or --postprocess actor"))
    batch = config.batch_size or (GPU_BATCH if per_actor > 0 else CPU_BATCH)
    return Resources(actors, per_actor, cpus_per_actor, in_actor, batch)


def read_block_rows(images: int, actors: int) -> int:
    """Images per input block, i.e. per read task (READ_BATCH above)."""
    balanced = math.ceil(images / (BLOCKS_PER_ACTOR * max(1, actors)))
    return max(min(max(balanced, READ_BATCH), READ_BLOCK_MAX), math.ceil(images / MAX_INPUT_BLOCKS))


def build_dataset(ds, plan: Plan, config: SegmentConfig, res: Resources, placement: Any = None):
    """The Ray Data graph over `ds` (the feed's blocks of `read_block_rows` images; lazy: iterate it
    to run). Its rows are FRAGMENT_SCHEMA: the staged fragments' paths and image ids, never masks.
    placement: a scheduling strategy for the inference actors (`spread_actors`), or None."""
    import ray.data

    # the actor classes by name only (pipeline/stages/actors.py): the driver never imports torch (~490 MiB of RSS)
    from pipeline.stages.actors import InferAndEncodeActor, InferenceActor
    from pipeline.stages.encode import encode_and_stage

    ds = ds.map_batches(
        # READ_CPUS != the actors' num_cpus also keeps Ray Data from fusing this stage into the
        # actor stage (it fuses task -> actor stages with equal resources): decoding stays in tasks.
        # CPU actors given exactly READ_CPUS (two on two 1-CPU nodes) do fuse: they decode themselves.
        # batch_size None: each feed block (at most READ_BLOCK_MAX images) in one call, as it comes; a
        # batch size would hold a part's last, smaller block back until later parts' rows arrive
        read_images, batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS,
        fn_kwargs={"storage_options": config.storage_options, "max_pixels": config.max_pixels,
                   "min_side": config.min_side})
    stage = {"output": config.output, "storage_options": config.storage_options, "run_id": plan.run_id}
    actor_kwargs = {"checkpoint": config.checkpoint, "inference": config.inference.to_dict(),
                    "storage_options": config.storage_options, "amp": config.amp,
                    "torch_threads": max(1, int(res.cpus_per_actor)), "compile": config.compile,
                    "checkpoint_sha256": plan.checkpoint_sha256, "predictor_factory": config.predictor_factory}
    ds = ds.map_batches(
        InferAndEncodeActor if res.postprocess_in_actor else InferenceActor, batch_format="pyarrow",
        batch_size=res.batch_size, compute=ray.data.ActorPoolStrategy(size=res.actors, **_overlap(res)),
        num_gpus=res.gpus_per_actor, num_cpus=res.cpus_per_actor,
        **({"scheduling_strategy": placement} if placement is not None else {}),
        fn_constructor_kwargs={**actor_kwargs, "stage": stage} if res.postprocess_in_actor else actor_kwargs)
    if res.postprocess_in_actor:
        return ds
    return ds.map_batches(encode_and_stage, batch_format="pyarrow", batch_size=ENCODE_BATCH, num_cpus=ENCODE_CPUS,
                          fn_kwargs=stage)


def _overlap(res: Resources) -> dict[str, Any]:
    """GPU actors take CONCURRENT_CALLS calls at once: one batch's host work (pinned staging,
    packing) overlaps the next batch's device work, which runs on the actor's one device thread
    (pipeline/stages/infer.py). CPU actors run one call at a time: their host and device are the same cores."""
    if res.gpus_per_actor <= 0:
        return {}
    return {"max_concurrent_calls_per_actor": CONCURRENT_CALLS, "enable_true_multi_threading": True}


@contextmanager
def spread_actors(res: Resources, node_cpus: list[float], log: Callable[[str], None]) -> Iterator[Any]:
    """A placement group of one bundle per CPU actor, spread over the nodes, while the job runs.

    Ray Data's default actor placement (SPREAD) is best effort: on two 1-CPU nodes, with actors of
    0.5 CPU, both actors landed on one node while read tasks held the other (a CI run of the
    two-node test), so one core did all the inference. Bundles are placed all at once, before any
    task holds a node: one per node where there are no more actors than nodes (STRICT_SPREAD),
    else as evenly as Ray can (SPREAD); an actor that dies restarts into its freed bundle. GPU
    actors need none (a GPU pins them), nor does one node. Yields the actors' scheduling strategy,
    or None where no group is needed or it cannot be placed in SPREAD_WAIT_S."""
    if res.gpus_per_actor > 0 or res.actors < 2 or len(node_cpus) < 2:
        yield None
        return
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # SPREAD alone put both bundles on one node too (a node's freed CPUs reach the scheduler late)
    strategy = "STRICT_SPREAD" if res.actors <= len(node_cpus) else "SPREAD"
    group = placement_group([{"CPU": res.cpus_per_actor}] * res.actors, strategy=strategy)
    try:
        ready, _ = ray.wait([group.ready()], timeout=SPREAD_WAIT_S)
        if ready:
            yield PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=False)
        else:
            log(f"warning: {res.actors} CPU actors could not be spread over the nodes in {SPREAD_WAIT_S:.0f} s; "
                f"Ray places them as it can")
            yield None
    finally:
        remove_placement_group(group)


def resources_record(res: Resources, cluster: dict[str, float], node_cpus: list[float]) -> dict[str, Any]:
    """What the run's record says about where it ran (the report's 'Runs' table)."""
    return {"actors": res.actors, "gpus_per_actor": res.gpus_per_actor, "cpus_per_actor": res.cpus_per_actor,
            "batch_size": res.batch_size, "postprocess": "actor" if res.postprocess_in_actor else "tasks",
            "nodes": len(node_cpus), "cluster_cpus": cluster.get("CPU", 0.0), "cluster_gpus": cluster.get("GPU", 0.0)}
