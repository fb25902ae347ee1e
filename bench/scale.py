"""The driver at bucket scale: planning time and memory, and driver RSS over a long run.

    python bench/scale.py plan --entries 1000000      # --dry-run on a generated 1M-entry manifest
    python bench/scale.py run --images 2000           # the job on N generated images, narrow model
    python bench/scale.py list --keys 50000           # listing an S3 prefix: memory per key
    python bench/scale.py synthlist --keys 10000000   # listing 10M keys behind 200 ms LIST pages
    python bench/scale.py synthstart --keys 10000000  # the job on them: until its first shards reach the actors
    python bench/scale.py table --images 10000000 --group 256 --checkpoint-every 100   # Delta commits at scale
    python bench/scale.py plan run                     # plan and run

plan: writes a Parquet manifest of N URIs (no images: --dry-run reads none) and times
      `python -m jobs.segment --dry-run` on it in a child process; prints its wall time and
      peak RSS (targets at 10M entries: <= 30 s, <= 1.5 GB).
replan: a re-run's planning over an unchanged bucket of N keys, in process: the table's state (N ok
      rows) and the same keys listed again, classified in parts of 100,000 as a streamed run does
      (target: planning <= 2x the listing's time; the listing of 10M takes ~85 s at 200 ms a page).
list: puts N empty .jpg keys under s3://<bucket>/images/ on a real S3 endpoint (moto's server on
      loopback) and lists the prefix in child processes, once as the listing did before
      (`fs.find`, which builds and caches an info dict per key) and once with `list_inputs`
      (ListObjectsV2 pages into Arrow arrays); prints each one's peak memory (tracemalloc's peak
      of Python objects plus pyarrow's allocations, after a warm-up listing loaded the S3
      client and its models), per key.
synthlist: a loopback S3 endpoint in this process (`ListingServer`: ListObjectsV2 over N generated
      keys, each page after --page-delay-ms) listed by `list_inputs` in a child process; prints
      keys/s (target >= 100,000 at 200 ms per page of 1000), LIST requests, the CPU seconds of
      the client and the endpoint, and the client's peak RSS.
synthstart: the job itself (`python -m jobs.segment`, local Ray, one CPU actor) on the same
      endpoint; prints the time until its log says the first shards were handed to the actors
      (target <= 30 s at 10M keys, 200 ms per page), then ends it (the keys have no objects).
table: commits the shards of an N-image run (shards of 128: 78k shards at 10M images) to the
      segments Delta table on a real S3 endpoint (moto's server on loopback), --group shards per
      commit (one commit each, with the run's app transaction, its fencing generation and its
      record), the log checkpointed every --checkpoint-every versions; the add actions carry
      realistic sizes and stats, and only the first and last shards' files are uploaded (real
      Parquet whose stats match). Prints shards/s committed, how the rate moves as the log grows,
      and the time a fresh process takes to open the finished table (targets: >= 100 shards/s,
      open < 10 s).
run:  runs `python -m jobs.segment` on N small generated PNGs with checkpoints/narrow_synth.pt,
      samples the driver process's RSS every 0.5 s, and prints the mean RSS of the first and
      the last quarter of the run and their ratio (target: within 10%, i.e. <= 1.10), plus
      images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on sys.path, where bench/pipeline.py would shadow the `pipeline` package.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
CHECKPOINT = REPO / "checkpoints" / "narrow_synth.pt"

from bench.synthkeys import ListingServer, SyntheticKeys  # noqa: E402  (after the sys.path fix above)


def _sample_rss(proc: subprocess.Popen, every_s: float, out: list[tuple[float, int]]) -> threading.Thread:
    """Samples `proc`'s own RSS (the driver; not the Ray processes it starts) until it exits."""
    def loop() -> None:
        p = psutil.Process(proc.pid)
        t0 = time.monotonic()
        while proc.poll() is None:
            try:
                out.append((time.monotonic() - t0, p.memory_info().rss))
            except psutil.NoSuchProcess:
                return
            time.sleep(every_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _run_sampled(cmd: list[str], every_s: float, env: dict[str, str]) -> tuple[str, float, list[tuple[float, int]]]:
    """Runs `cmd` from the repo root while sampling its RSS; returns (stdout, wall s, samples)."""
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    sampler = _sample_rss(proc, every_s, samples)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {stderr[-2000:]}")
    return stdout, wall, samples


def bench_plan(entries: int, workdir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = workdir / "manifest.parquet"
    import pyarrow.compute as pc

    i = pa.array(np.arange(entries))  # s3://bucket/images/{i // 1000:04d}/{i:08d}.jpg, built in Arrow
    pad = lambda a, w: pc.utf8_lpad(pc.cast(a, pa.string()), w, "0")  # noqa: E731
    uris = pc.binary_join_element_wise("s3://bucket/images/", pad(pc.divide(i, 1000), 4), "/", pad(i, 8), ".jpg", "")
    pq.write_table(pa.table({"uri": uris}), manifest)
    del uris, i
    cmd = [sys.executable, "-m", "jobs.segment", "--input", str(manifest), "--output", str(workdir / "out"),
           "--checkpoint", str(CHECKPOINT), "--dry-run"]
    stdout, wall, samples = _run_sampled(cmd, 0.1, {})
    peak = max(r for _, r in samples) if samples else 0
    print(stdout.strip())
    print(f"plan {entries} manifest entries: {wall:.1f} s (target <= 30 s at 10M), driver peak RSS "
          f"{peak / 2**20:.0f} MiB (target <= 1536 MiB at 10M; sampled every 0.1 s); load average {os.getloadavg()[0]:.1f}")


LIST_CHILD = """
import gc, sys, time, tracemalloc
import pyarrow as pa
import s3fs
from pipeline.planning.sources import list_inputs
fs = s3fs.S3FileSystem()  # the instance list_inputs gets too (fsspec caches it)
# warm-up on one folder of 1000 keys: S3 client, botocore models, pyarrow kernels (~25 MB of imports)
list_inputs("s3://bucket/images/0000/"); fs.find("bucket/images/0000")
fs.invalidate_cache(); gc.collect()
tracemalloc.start()
t0 = time.perf_counter()
if sys.argv[1] == "find":  # the listing before: fs.find, then Python lists of every key
    keys = [p for p in fs.find(sys.argv[2].removeprefix("s3://"), withdirs=False)]
    n = len(keys)
else:
    n = len(list_inputs(sys.argv[2]))
wall = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] + pa.total_allocated_bytes()
print(n, wall, peak)
"""


def bench_list(keys: int, workdir: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import s3fs
    from fixtures_infra import S3Server

    server = S3Server.start(workdir)
    try:
        os.environ.update(server.env)  # this process's s3fs and the children reach the endpoint
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bucket")
        t0 = time.perf_counter()
        for lo in range(0, keys, 5000):
            fs.pipe({f"bucket/images/{i // 1000:04d}/{i:08d}.jpg": b"" for i in range(lo, min(keys, lo + 5000))})
        print(f"put {keys} keys in {time.perf_counter() - t0:.0f} s")
        for how in ("find", "list_inputs"):
            out = subprocess.run([sys.executable, "-c", LIST_CHILD, how, "s3://bucket/images/"], cwd=REPO,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if out.returncode != 0:
                raise SystemExit(f"list with {how} failed: {out.stderr[-2000:]}")
            n, wall, grew = out.stdout.split()
            print(f"list {how:11s}: {int(n)} keys in {float(wall):.1f} s (traced), peak {int(grew) / 2**20:.1f} MiB "
                  f"of Python objects + Arrow buffers ({int(grew) / max(1, int(n)):.0f} bytes per key)")
    finally:
        server.stop()


# ---------------------------------------------------------------------------- listing: a synthetic S3 endpoint

SYNTH_CHILD = """
import json, sys, time
import psutil, pyarrow as pa
from pipeline.planning.sources import list_inputs
t0 = time.perf_counter()
cpu0 = sum(psutil.Process().cpu_times()[:2])
skipped = {}
listing = list_inputs(sys.argv[1], skipped=skipped)
wall = time.perf_counter() - t0
print(json.dumps({"n": len(listing), "wall": wall, "cpu": sum(psutil.Process().cpu_times()[:2]) - cpu0,
                  "rss": psutil.Process().memory_info().rss, "first": listing.image_ids[0].as_py(),
                  "last": listing.image_ids[-1].as_py()}))
"""


SYNTH_PARTS_CHILD = """
import json, sys, time
import psutil
from pipeline.planning.parts import listing_parts
rate, limit_s = float(sys.argv[2]), float(sys.argv[3])
t0 = time.perf_counter()
cpu0 = sum(psutil.Process().cpu_times()[:2])
n = parts = 0
for part in listing_parts(sys.argv[1], None, {}):
    n, parts = n + len(part.listing), parts + 1
    if rate:
        time.sleep(len(part.listing) / rate)  # a run whose actors take `rate` images/s
    if limit_s and time.perf_counter() - t0 > limit_s:
        break
print(json.dumps({"n": n, "parts": parts, "wall": time.perf_counter() - t0,
                  "cpu": sum(psutil.Process().cpu_times()[:2]) - cpu0, "rss": psutil.Process().memory_info().rss}))
"""


def _synthetic_child(server: ListingServer, code: str, *args: str) -> tuple[dict, int, float]:
    """Runs `code` in a child against `server`: its JSON line, its peak RSS and the endpoint's CPU-s."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": server.endpoint,
           "AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    samples: list[tuple[float, int]] = []
    server_cpu = sum(psutil.Process().cpu_times()[:2])
    proc = subprocess.Popen([sys.executable, "-c", code, "s3://bucket/images/", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = _sample_rss(proc, 0.2, samples)
    stdout, stderr = proc.communicate()
    sampler.join()
    server_cpu = sum(psutil.Process().cpu_times()[:2]) - server_cpu
    if proc.returncode != 0:
        raise SystemExit(f"listing the synthetic endpoint failed: {stderr[-2000:]}")
    r = json.loads(stdout)
    return r, max((s for _, s in samples), default=r["rss"]), server_cpu


def bench_synthetic_list(keys: int, delay_s: float) -> None:
    """Lists `keys` synthetic keys behind `delay_s` per page with `list_inputs` in a child process."""
    server = ListingServer(SyntheticKeys(keys), delay_s)
    try:
        r, peak, server_cpu = _synthetic_child(server, SYNTH_CHILD)
        if r["n"] != keys:
            raise SystemExit(f"listed {r['n']} keys of {keys}")
        print(f"list {keys} synthetic keys, {delay_s * 1000:.0f} ms per page of 1000: {r['wall']:.1f} s -> "
              f"{keys / r['wall']:,.0f} keys/s (target >= 100,000); {server.pages} LIST requests; client "
              f"{r['cpu']:.1f} CPU-s, endpoint {server_cpu:.1f} CPU-s; peak RSS {peak / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.1f}")
    finally:
        server.stop()


def bench_synthetic_parts(keys: int, delay_s: float, rate: float, limit_s: float) -> None:
    """Lists `keys` synthetic keys in a run's parts (`listing_parts`, paced) taken by a consumer of
    `rate` images/s (0: as fast as they come, a re-run with nothing to do) for at most `limit_s`:
    how far the listing runs ahead of a slow run, and its speed for a fast one."""
    server = ListingServer(SyntheticKeys(keys), delay_s)
    try:
        r, peak, server_cpu = _synthetic_child(server, SYNTH_PARTS_CHILD, str(rate), str(limit_s))
        ahead = server.served - r["n"]
        print(f"list {keys} synthetic keys in parts, {delay_s * 1000:.0f} ms per page of 1000, consumer "
              f"{f'{rate:,.0f} images/s' if rate else 'as fast as they come'}: {r['parts']} parts, {r['n']:,} keys "
              f"taken in {r['wall']:.1f} s ({r['n'] / r['wall']:,.0f} keys/s); the endpoint served {server.served:,} "
              f"keys ({ahead:,} listed ahead of the consumer) in {server.pages} LIST requests; client {r['cpu']:.1f} "
              f"CPU-s; peak RSS {peak / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.1f}")
    finally:
        server.stop()


def bench_synthetic_start(keys: int, delay_s: float, workdir: Path) -> None:
    """Runs the job (`jobs.segment`, local Ray, one CPU actor) on `keys` synthetic keys behind
    `delay_s` per page and times its start: until the log says the first shards were handed to the
    actors (the feed's first block in the graph's queue), from the child's spawn and from the run's
    own start. The keys have no objects (reads fail: error rows), so the child is ended there."""
    import signal

    server = ListingServer(SyntheticKeys(keys), delay_s)
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": server.endpoint,
           "AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "RAY_ADDRESS": "local",
           "CUDA_VISIBLE_DEVICES": ""}
    out = workdir / "synthstart-out"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.segment", "--input", "s3://bucket/images/", "--output",
                             str(out), "--checkpoint", str(CHECKPOINT), "--actors", "1"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(f"{time.perf_counter() - t0:6.1f} s  {line.rstrip()}")
            if "first shards handed to the actors" in line:
                print("\n".join(lines))  # the job's log until then, with the seconds since its spawn
                wall = time.perf_counter() - t0
                pages = server.pages
                parts = len(list(out.glob("_runs/*/listing/part-*.parquet")))
                own = float(line.split("actors ")[1].split(" s")[0])
                print(f"start {keys} synthetic keys, {delay_s * 1000:.0f} ms per page of 1000: first shards handed to "
                      f"the actors {wall:.1f} s after spawning the job ({own:.1f} s after its start; target <= 30 s); "
                      f"{pages} LIST requests and {parts} listing part(s) snapshotted by then; "
                      f"load average {os.getloadavg()[0]:.1f}")
                return
        raise SystemExit("the job ended before handing shards over:\n" + "\n".join(lines[-30:]))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        server.stop()


def bench_run(images: int, workdir: Path) -> None:
    from PIL import Image

    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    for i in range(images):
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i:06d}.png")
    cmd = [sys.executable, "-m", "jobs.segment", "--input", str(folder), "--output", str(workdir / "run"),
           "--checkpoint", str(CHECKPOINT), "--scales", "64,96", "--max-proposals", "50", "--shard-size", "16"]
    stdout, wall, samples = _run_sampled(cmd, 0.5, {"RAY_ADDRESS": "local"})
    print(stdout.strip())
    # The run proper: from the first commit log line's time on would need log parsing; instead drop
    # the first 20% of samples (imports, Ray start-up, planning) and compare quarters of the rest.
    rest = samples[len(samples) // 5:]
    q = max(1, len(rest) // 4)
    first, last = np.mean([r for _, r in rest[:q]]), np.mean([r for _, r in rest[-q:]])
    print(f"run {images} images: {wall:.1f} s ({images / wall:.2f} images/s end to end); driver RSS first quarter "
          f"{first / 2**20:.0f} MiB, last quarter {last / 2**20:.0f} MiB, ratio {last / first:.3f} "
          f"(target <= 1.10); peak {max(r for _, r in samples) / 2**20:.0f} MiB; {len(samples)} samples")


# ---------------------------------------------------------------------------- table: Delta commits at scale

S3_DELTA_OPTIONS = {"AWS_ALLOW_HTTP": "true", "conditional_put": "etag", "AWS_REGION": "us-east-1"}
STATS_STRING_PREFIX = 32  # delta-rs keeps this many characters of a string's min/max


def _shard_table(shard: int, per_shard: int, proposals: int, run_id: str):
    """One shard's rows of the segments table as the job writes them (random but well-formed values;
    proposals nested)."""
    import pyarrow as pa

    sys.path.insert(0, str(REPO))  # the package, not bench/pipeline.py beside this script
    from pipeline.tables.schema import PROPOSAL_TYPE, SEGMENTS_SCHEMA

    rng = np.random.default_rng(shard)
    ids = [f"images/{shard:06d}/{i:04d}.jpg" for i in range(per_shard)]
    n = per_shard * proposals
    alphabet = np.frombuffer(b"0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmno", np.uint8)
    rle = alphabet[rng.integers(0, len(alphabet), (n, 80))].view("S80").ravel().astype(str)
    score = np.sort(rng.random((per_shard, proposals)).astype(np.float32), axis=1)[:, ::-1].ravel()
    columns = {"rank": np.tile(np.arange(proposals, dtype=np.int32), per_shard), "score": score,
               "bbox": pa.array(list(rng.random((n, 4)).astype(np.float32) * 400), pa.list_(pa.float32())),
               "area": rng.integers(50, 60000, n), "rle": rle,
               "scale": rng.choice(np.array([267, 400, 600], np.int32), n)}
    nested = pa.ListArray.from_arrays(pa.array(np.arange(0, n + 1, proposals), pa.int32()), pa.StructArray.from_arrays(
        [pa.array(columns[f.name]).cast(f.type) for f in PROPOSAL_TYPE], fields=list(PROPOSAL_TYPE)))
    f32 = lambda: rng.random(per_shard).astype(np.float32) * 100  # noqa: E731
    return pa.table({
        "image_id": ids, "uri": [f"s3://bucket/{x}" for x in ids], "width": np.full(per_shard, 640, np.int32),
        "height": np.full(per_shard, 480, np.int32), "status": ["ok"] * per_shard, "error": [None] * per_shard,
        "num_proposals": np.full(per_shard, proposals, np.int32), "read_ms": f32(), "decode_ms": f32(),
        "infer_ms": f32(), "postprocess_ms": f32(), "etag": [f'"{i:032x}"' for i in range(per_shard)],
        "size": rng.integers(50_000, 400_000, per_shard), "shard_id": [f"{shard:06d}"] * per_shard,
        "run_id": [run_id] * per_shard, "proposals": nested}, schema=SEGMENTS_SCHEMA)


def _stats(t) -> dict:
    """Delta stats of a table as delta-rs writes them: numRecords, and per primitive column min, max
    (strings cut to 32 characters) and nullCount."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lo, hi, nulls = {}, {}, {}
    for name, col in zip(t.column_names, t.columns):
        if pa.types.is_nested(col.type):
            continue
        nulls[name] = col.null_count
        mm = pc.min_max(col).as_py()
        if mm["min"] is not None:
            cut = (lambda v: v[:STATS_STRING_PREFIX]) if pa.types.is_string(col.type) else (lambda v: v)
            lo[name], hi[name] = cut(mm["min"]), cut(mm["max"])
    return {"numRecords": t.num_rows, "minValues": lo, "maxValues": hi, "nullCount": nulls}


def _shard_stats(template: dict, shard: int, per_shard: int) -> str:
    """The template shard's stats with this shard's ids: what its file's add action would say."""
    s = json.loads(json.dumps(template))
    first, last = f"images/{shard:06d}/0000.jpg", f"images/{shard:06d}/{per_shard - 1:04d}.jpg"
    for key, lo, hi in (("image_id", first, last), ("uri", f"s3://bucket/{first}", f"s3://bucket/{last}"),
                        ("shard_id", f"{shard:06d}", f"{shard:06d}")):
        s["minValues"][key], s["maxValues"][key] = lo[:STATS_STRING_PREFIX], hi[:STATS_STRING_PREFIX]
    return json.dumps(s, separators=(",", ":"))


OPEN_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from deltalake import DeltaTable, QueryBuilder
import pyarrow as pa, pyarrow.compute as pc
opts, out, app_id, shard, with_dataset = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
res = {"import_s": time.perf_counter() - t0}
for name in ("segments",):
    t0 = time.perf_counter()
    dt = DeltaTable(f"{out}/{name}", storage_options=opts)
    opened = time.perf_counter()
    files = pa.table(dt.get_add_actions(flatten=True))
    listed = time.perf_counter()
    # DataFusion prunes files by their shard_id stats, then reads the one file left
    sql = f"select image_id, count(*) as n from {name} where shard_id = '{shard}' group by image_id"
    got = pa.table(QueryBuilder().register(name, dt).execute(sql).read_all())
    queried = time.perf_counter()
    r = {"version": dt.version(), "files": files.num_rows, "rows_in_log": pc.sum(files["num_records"]).as_py(),
         "app_version": dt.transaction_version(app_id), "open_s": opened - t0, "file_list_s": listed - opened,
         "query_s": queried - listed, "query_rows": pc.sum(got["n"]).as_py()}
    if with_dataset:  # pyarrow's dataset over every file: one fragment (and stats expression) per file
        dt.to_pyarrow_dataset()
        r["pyarrow_dataset_s"] = time.perf_counter() - queried
    res[name] = r
print(json.dumps(res))
"""


def bench_table(images: int, shard_size: int, group: int, checkpoint_every: int, proposals: int,
                workdir: Path, with_dataset: bool = False) -> None:
    import pyarrow.parquet as pq

    from pipeline.tables.delta import OutputTables

    sys.path.insert(0, str(REPO / "tests"))
    import s3fs
    from fixtures_infra import S3Server

    shards = -(-images // shard_size)
    run_id, app_id = "bench-run", "ifcn-segment/bench-run"
    server = S3Server.start(workdir)
    try:
        os.environ.update(server.env)
        opts = {**S3_DELTA_OPTIONS, "AWS_ENDPOINT_URL": server.endpoint}
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        out = "s3://bench/out"
        # the pipeline's own commit code: one commit per group, app transaction, fencing, run record, checkpoints
        tables = OutputTables(out, checkpoint_every=checkpoint_every)
        record, settings = {"run_id": run_id, "exit": "running"}, {"bench": True}
        tables.fence(record, settings)
        # Real files for the first and the last shard (what the open-time query reads); every other
        # shard's add action copies their stats with its own ids and the measured size per row.
        real, template = {}, None
        for shard in sorted({0, shards - 1}):
            per = min(shard_size, images - shard * shard_size)
            t = _shard_table(shard, per, proposals, run_id)
            path = f"part-{shard:06d}-{run_id}-{uuid.uuid4()}.parquet"
            with fs.open(f"bench/out/segments/{path}", "wb") as f:
                pq.write_table(t, f, compression="zstd")
            real[shard] = {"path": path, "size": fs.size(f"bench/out/segments/{path}"),
                           "modification_time": int(time.time() * 1000), "stats": json.dumps(_stats(t))}
            template = template or (_stats(t), real[shard]["size"] / t.num_rows)
        print(f"template shard: file {real[0]['size'] / 2**20:.1f} MiB ({shard_size} images, "
              f"{shard_size * proposals} proposals); stats JSON {len(real[0]['stats'])} bytes")

        def adds(shard: int) -> dict:
            """The add-action facts a publish task returns (pipeline.tables.files.write_data_file)."""
            if shard in real:
                return real[shard]
            stats, per_row = template
            return {"path": f"part-{shard:06d}-{run_id}-{uuid.uuid4()}.parquet",
                    "size": int(per_row * stats["numRecords"]), "modification_time": int(time.time() * 1000),
                    "stats": _shard_stats(stats, shard, shard_size)}

        commit_s = build_s = 0.0
        groups, done, last = 0, 0, (0, 0.0)  # last: (shards, commit s) at the previous progress line
        # CPU seconds of this process and the S3 server: the commit loop runs one of them at a time,
        # so on a quiet machine its wall time is about their sum (the load of other jobs moves it less)
        procs = [psutil.Process(), psutil.Process(server.proc.pid)]
        cpu = lambda: sum(sum(p.cpu_times()[:2]) for p in procs)  # noqa: E731
        t_start, load0, cpu0 = time.perf_counter(), os.getloadavg()[0], cpu()
        cpu_last = cpu0
        for version, lo in enumerate(range(0, shards, group)):
            t0 = time.perf_counter()
            ids = range(lo, min(shards, lo + group))
            group_results = [adds(s) for s in ids]
            t1 = time.perf_counter()
            tables.commit_group(app_id, version + 1, group_results, [], record)
            t2 = time.perf_counter()
            build_s, commit_s, done, groups = build_s + t1 - t0, commit_s + t2 - t1, done + len(ids), groups + 1
            if done * 20 // shards > (done - len(ids)) * 20 // shards:  # every 5%
                now = cpu()
                print(f"  {done:6d}/{shards} shards, table version {tables.open().version()}: "
                      f"{done / commit_s:.0f} shards/s so far, {(done - last[0]) / (commit_s - last[1]):.0f} since "
                      f"the last line ({(done - last[0]) / (now - cpu_last):.0f} per CPU-second; "
                      f"{(t2 - t1) * 1000:.0f} ms for this group's commit)", flush=True)
                last, cpu_last = (done, commit_s), now
        wall, cpu_s = time.perf_counter() - t_start, cpu() - cpu0
        print(f"committed {shards} shards ({images} images, shard size {shard_size}) in {groups} groups of "
              f"{group}: {commit_s:.1f} s in commits -> {shards / commit_s:.0f} shards/s (target >= 100); "
              f"{cpu_s:.1f} CPU-s (driver + S3 server) -> {shards / cpu_s:.0f} shards per CPU-second; "
              f"{wall:.1f} s wall incl. {build_s:.1f} s building add actions; load average "
              f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
        child = subprocess.run([sys.executable, "-c", OPEN_CHILD, json.dumps(opts), out, app_id, f"{shards - 1:06d}",
                                "1" if with_dataset else "0"],
                               capture_output=True, text=True, env={**os.environ, "RUST_LOG": "error"})
        if child.returncode != 0:
            raise SystemExit(f"opening the table failed: {child.stderr[-2000:]}")
        res = json.loads(child.stdout)
        for name in ("segments",):
            r = res[name]
            total = r["open_s"] + r["file_list_s"] + r["query_s"]
            print(f"open {name}: version {r['version']}, {r['files']} files, {r['rows_in_log']} rows by the log, "
                  f"app version {r['app_version']}: DeltaTable() {r['open_s']:.2f} s + file list "
                  f"{r['file_list_s']:.2f} s + one shard's rows ({r['query_rows']}) {r['query_s']:.2f} s = "
                  f"{total:.2f} s (target < 10)"
                  + (f"; DeltaTable.to_pyarrow_dataset() {r['pyarrow_dataset_s']:.1f} s" if with_dataset else ""))
    finally:
        server.stop()


def bench_replan(entries: int, part_rows: int = 100_000, table_files: int = 0, workdir: Path | None = None) -> None:
    """A re-run's planning over an unchanged bucket, in process: the table's state (`entries` ok rows)
    and the same keys listed again, part by part, classified as a streamed run does (plan.Classifier),
    each part's keys made as it comes (a listing is not held whole). The state is held in memory,
    or, with `table_files`, read by key range from a Delta table of that many data files written
    first (`OutputTables.state_ranges`: what a run does; a real run has one file per 128-image shard)."""
    import resource

    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.planning.plan import Classifier
    from pipeline.planning.sources import Listing
    from pipeline.tables.files import FILE_COLUMN

    pad = lambda a, w: pc.utf8_lpad(pc.cast(a, pa.string()), w, "0")  # noqa: E731

    def keys(a: int, n: int) -> tuple[pa.Array, pa.Array, pa.Array]:
        """ids, etags and sizes of keys a..a+n."""
        i = pa.array(np.arange(a, a + n))
        ids = pc.binary_join_element_wise("images/", pad(pc.divide(i, 1000), 4), "/", pad(i, 8), ".jpg", "")
        return ids, pc.binary_join_element_wise("\"", pad(i, 10), "\"", ""), pa.array(np.full(n, 123_456, np.int64))

    if table_files:
        state = _replan_table(entries, table_files, keys, workdir)
        where = f"read by range from a Delta table of {table_files:,} files"
    else:
        ids, etags, sizes = keys(0, entries)
        zeros = pa.array(np.zeros(entries, np.int64))
        state = pa.table({"image_id": ids, "status": pa.array(["ok"]).take(zeros), "etag": etags, "size": sizes,
                          FILE_COLUMN: pa.array(["part-0.parquet"]).take(zeros)})
        where = "held in memory"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    classifier, pending, parts = Classifier(state), 0, 0
    for a in range(0, entries, part_rows):
        n = min(part_rows, entries - a)
        ids, etags, sizes = keys(a, n)
        part = Listing.build(ids, pc.binary_join_element_wise("s3://bucket/", ids, ""), "s3://bucket/images/",
                             etags, sizes)
        pending += len(classifier.part(part).pending)
        parts += 1
    vanished = len(classifier.vanished())
    wall = time.perf_counter() - t0
    print(f"re-plan {entries:,} unchanged keys in {parts} parts, the state {where}: {wall:.1f} s ({pending} pending, "
          f"{vanished} vanished); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"({rss0:.0f} before planning; an in-memory state is the bench's own); load average {os.getloadavg()[0]:.1f}")


def _replan_table(entries: int, files: int, keys: Callable, workdir: Path):
    """A Delta table of `entries` ok rows in `files` data files, written file by file; its state reader."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import Schema
    from deltalake.transaction import AddAction, create_table_with_add_actions

    from pipeline.tables.delta import OutputTables
    from pipeline.tables.files import file_stats
    from pipeline.tables.schema import SEGMENTS_SCHEMA

    root = workdir / "replan" / "segments"
    root.mkdir(parents=True)
    adds, per, t0 = [], -(-entries // files), time.perf_counter()
    for f, a in enumerate(range(0, entries, per)):
        n = min(per, entries - a)
        ids, etags, sizes = keys(a, n)
        cols = {"image_id": ids, "uri": pa.array(["s3://bucket/x"] * n), "status": pa.array(["ok"] * n),
                "etag": etags, "size": sizes, "num_proposals": pa.array(np.zeros(n, np.int32)),
                "shard_id": pa.array([f"{f:06d}"] * n), "run_id": pa.array(["r"] * n)}
        t = pa.table({name: cols[name].cast(SEGMENTS_SCHEMA.field(name).type) if name in cols
                      else pa.nulls(n, SEGMENTS_SCHEMA.field(name).type) for name in SEGMENTS_SCHEMA.names})
        pq.write_table(t, root / f"part-{f:06d}.parquet")
        adds.append(AddAction(f"part-{f:06d}.parquet", (root / f"part-{f:06d}.parquet").stat().st_size, {}, 0, True,
                              file_stats(t)))
    create_table_with_add_actions(str(root), Schema.from_arrow(SEGMENTS_SCHEMA), adds, mode="error")
    print(f"wrote the table: {entries:,} rows in {len(adds):,} files in {time.perf_counter() - t0:.1f} s")
    return OutputTables(str(root.parent)).state_ranges()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="+",
                   choices=("plan", "replan", "list", "synthlist", "synthparts", "synthstart", "run", "table"))
    p.add_argument("--entries", type=int, default=1_000_000, help="manifest entries to plan")
    p.add_argument("--keys", type=int, default=50_000, help="S3 keys to list (list: in moto; synthlist: synthetic)")
    p.add_argument("--page-delay-ms", type=float, default=200.0, help="synthlist: the endpoint's delay per LIST page")
    p.add_argument("--table-files", type=int, default=0,
                   help="replan: read the state by range from a Delta table of this many files (0: in memory)")
    p.add_argument("--consume-rate", type=float, default=0.0,
                   help="synthparts: images/s the consumer of the parts takes (0: as fast as they come)")
    p.add_argument("--consume-s", type=float, default=0.0, help="synthparts: stop the consumer after this long")
    p.add_argument("--images", type=int, help="images for the long run (default 2000) or the table (default 10M)")
    p.add_argument("--shard-size", type=int, default=128, help="table: images per shard (the job's default)")
    p.add_argument("--group", type=int, default=256, help="table: shards per commit")
    p.add_argument("--checkpoint-every", type=int, default=100, help="table: versions between log checkpoints")
    p.add_argument("--proposals", type=int, default=1000, help="table: proposals per image")
    p.add_argument("--pyarrow-dataset", action="store_true",
                   help="table: also time DeltaTable.to_pyarrow_dataset() on the finished tables (minutes at 10M)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ifcn-scale-") as tmp:
        if "plan" in args.what:
            bench_plan(args.entries, Path(tmp))
        if "replan" in args.what:
            bench_replan(args.entries, table_files=args.table_files, workdir=Path(tmp))
        if "list" in args.what:
            bench_list(args.keys, Path(tmp))
        if "synthlist" in args.what:
            bench_synthetic_list(args.keys, args.page_delay_ms / 1000)
        if "synthparts" in args.what:
            bench_synthetic_parts(args.keys, args.page_delay_ms / 1000, args.consume_rate, args.consume_s)
        if "synthstart" in args.what:
            bench_synthetic_start(args.keys, args.page_delay_ms / 1000, Path(tmp))
        if "run" in args.what:
            bench_run(args.images or 2000, Path(tmp))
        if "table" in args.what:
            bench_table(args.images or 10_000_000, args.shard_size, args.group, args.checkpoint_every,
                        args.proposals, Path(tmp), args.pyarrow_dataset)


if __name__ == "__main__":
    main()
