"""Transient vs permanent failures: which ones a re-run retries, and how the driver leaves their shards."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from botocore.exceptions import EndpointConnectionError, NoCredentialsError

from ifcn.image import ImageError
from pipeline.errors import RETRY, is_transient, with_retries
from pipeline.sink import OutputStore, StageWriter
from pipeline.sources import InputItem, Listing, make_shards
from pipeline.schema import REDUCED_SCHEMA


@pytest.mark.parametrize("error, transient", [
    (ImageError("s3://b/x.jpg", "not a JPEG/PNG"), False),  # the bytes' fault: a final error row
    (FileNotFoundError("gone"), False),
    (IsADirectoryError("dir"), False),
    (ValueError("bad header"), False),
    (RuntimeError("shape mismatch"), False),  # a model/code failure on this input
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),  # S3 down
    (NoCredentialsError(), True),  # credentials expired or not yet mounted
    (ConnectionResetError("peer reset"), True),
    (TimeoutError("read timed out"), True),
    (PermissionError("403 AccessDenied"), True),  # expired session tokens answer 403 too
    (MemoryError(), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
])
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_with_retries_backs_off_on_transient_and_stops_on_permanent() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("try again")
        return "bytes"

    assert with_retries(flaky, attempts=3, base_delay_s=0.0) == "bytes" and len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionResetError):
        with_retries(flaky, attempts=2, base_delay_s=0.0)  # still failing at the last attempt
    assert len(calls) == 2

    def corrupt() -> str:
        calls.append(1)
        raise ImageError("u", "truncated")

    calls.clear()
    with pytest.raises(ImageError):
        with_retries(corrupt, attempts=5, base_delay_s=10.0)  # no retry, no sleep
    assert len(calls) == 1


def _row(image_id: str, shard_id: str, status: str = "ok") -> dict:
    return {"image_id": image_id, "uri": f"file:///{image_id}", "width": 4, "height": 4, "status": status,
            "error": f"image {image_id}: reading failed 5 times (EndpointConnectionError)" if status == RETRY else None,
            "num_proposals": 0, "read_ms": 1.0, "decode_ms": 1.0, "infer_ms": 1.0, "postprocess_ms": 1.0,
            "shard_id": shard_id, "proposals": []}


def test_shard_with_a_transient_failure_is_left_for_a_rerun(tmp_path: Path) -> None:
    from pipeline.run import InlinePublisher, ShardCollector

    shards = make_shards([InputItem(i, f"file:///{i}") for i in "abcd"], 2)  # ab, cd
    out = str(tmp_path / "out")
    logs: list[str] = []
    listing = Listing.build([it.image_id for s in shards for it in s.items], [it.uri for s in shards for it in s.items])
    collector = ShardCollector(listing.spans(2), listing, InlinePublisher(out, None), logs.append)
    meta = StageWriter(out, None, "r1")(pa.Table.from_pylist(
        [_row("a", "000000"), _row("b", "000000", RETRY), _row("c", "000001"), _row("d", "000001")],
        schema=REDUCED_SCHEMA))
    assert meta.column("retry_ids").to_pylist() == [["b"], []]
    collector.add(meta)
    assert set(OutputStore(out).committed()) == {"000001"}  # the clean shard commits
    assert collector.left == {"000000": (1, "image b: reading failed 5 times (EndpointConnectionError)")}
    assert collector.missing() == [] and "shard 000000 left uncommitted" in logs[0]
    assert not (tmp_path / "out" / "images" / "part-000000.parquet").exists()  # no final error row for b


def test_publishing_rides_out_a_short_storage_outage(s3_server, s3_bucket: str) -> None:
    """The endpoint refuses connections for 6 s while a shard is published: the publish call
    backs off and commits it once the endpoint is back (no Ray retry, no failed run)."""
    import threading
    import time

    from fixtures_infra import TcpProxy
    from pipeline.run import InlinePublisher
    from pipeline.sink import Fragment

    proxy = TcpProxy(s3_server.endpoint.removeprefix("http://"))
    # botocore's retries off; s3fs's own (~2 s of backoff) are shorter than the outage, so what
    # rides it out is the project's backoff
    so = {"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True,
          "config_kwargs": {"retries": {"max_attempts": 1}}}
    out = f"{s3_bucket}/out"
    listing = Listing.build(["a", "b"], ["file:///a", "file:///b"])
    shard = listing.shard(listing.spans(2)[0])
    meta = StageWriter(out, so, "r1")(pa.Table.from_pylist([_row("a", "000000"), _row("b", "000000")],
                                                          schema=REDUCED_SCHEMA)).to_pylist()[0]
    publisher = InlinePublisher(out, so)
    proxy.down()
    try:
        worker = threading.Thread(target=publisher.submit, args=(shard, [Fragment(meta["path"], ("a", "b"))]))
        worker.start()
        time.sleep(6)
        assert worker.is_alive() and not OutputStore(out).committed()  # (this store goes straight to moto)
    finally:
        proxy.up()
    worker.join(timeout=60)
    assert not worker.is_alive()
    marker, = publisher.poll()
    assert marker["shard_id"] == "000000" and marker["num_images"] == 2
    assert OutputStore(out).committed() == {"000000": marker}
