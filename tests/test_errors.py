"""Transient vs permanent failures: which ones a re-run retries, which become error rows that
name their cause (the driver's retry rows are tested in tests/test_table.py). The S3 errors are the ones s3fs raises
when a real endpoint (moto's server) answers them: an archived (DEEP_ARCHIVE) object, a key the
job's IAM user may not read, a request with a bad parameter."""
from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator

import pyarrow as pa
import pytest
import torch
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from fixtures_infra import S3Server
from ifcn.image import ImageError, read_bytes
from pipeline.errors import classify, is_transient, with_retries
from pipeline.stages.read import read_images


def _client_error(code: str, message: str, status: int, operation: str = "GetObject") -> ClientError:
    """A ClientError as botocore raises it for an S3 error response (parsed XML body; a HEAD
    response has no body, so botocore's code is the bare status)."""
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


@pytest.mark.parametrize("error, transient, reason", [
    (ImageError("s3://b/x.jpg", "not a JPEG/PNG"), False, "image s3://b/x.jpg: not a JPEG/PNG"),
    (FileNotFoundError("gone"), False, "no such object (FileNotFoundError: gone)"),
    (IsADirectoryError("dir"), False, "no such object"),
    (ValueError("bad header"), False, "ValueError: bad header"),
    (RuntimeError("shape mismatch"), False, "RuntimeError: shape mismatch"),  # a model/code failure on this input
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True, "EndpointConnectionError"),  # S3 down
    (NoCredentialsError(), True, "NoCredentialsError"),  # credentials not yet mounted
    (ConnectionResetError("peer reset"), True, "ConnectionResetError: peer reset"),
    (TimeoutError("read timed out"), True, "TimeoutError"),
    (PermissionError(13, "Permission denied"), False, "permission denied (PermissionError: [Errno 13] "
                                                      "Permission denied); make it readable"),
    (MemoryError(), True, "out of memory (MemoryError: )"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True, "out of memory"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True, "CUDA error"),
    (_client_error("InvalidObjectState", "The operation is not valid for the object's storage class", 403),
     False, "the object is archived (S3 InvalidObjectState: The operation is not valid for the object's "
            "storage class); restore it from Glacier / Deep Archive, or exclude it from the input"),
    (_client_error("AccessDenied", "Access Denied", 403), False,
     "access denied (S3 AccessDenied: Access Denied); grant s3:GetObject on it to the job's credentials"),
    (_client_error("403", "Forbidden", 403, "HeadObject"), False, "access denied (S3 403: Forbidden)"),
    (_client_error("InvalidArgument", "Invalid argument", 400), False,
     "bad request (S3 InvalidArgument: Invalid argument); check the key and --storage-options"),
    (_client_error("NoSuchKey", "The specified key does not exist.", 404), False, "no such object (S3 NoSuchKey"),
    (_client_error("ExpiredToken", "The provided token has expired.", 400), True, "S3 ExpiredToken"),  # refreshed
    (_client_error("400", "Bad Request", 400, "HeadObject"), True, "S3 400: Bad Request"),  # ExpiredToken on HEAD
    (_client_error("SlowDown", "Please reduce your request rate.", 503), True, "S3 SlowDown"),
    (_client_error("InternalError", "We encountered an internal error.", 500), True, "S3 InternalError"),
])
def test_classify(error: BaseException, transient: bool, reason: str) -> None:
    got_transient, got_reason = classify(error)
    assert (got_transient, is_transient(error)) == (transient, transient)
    assert reason in got_reason and "\n" not in got_reason


def test_the_cpu_allocators_failure_is_transient() -> None:
    """torch's real error for a host allocation that cannot be met (2**60 bytes)."""
    with pytest.raises(RuntimeError) as e:
        torch.empty(2**60, dtype=torch.uint8)
    assert "DefaultCPUAllocator" in str(e.value)
    transient, reason = classify(e.value)
    assert transient and reason.startswith("out of memory (RuntimeError: ") and "\n" not in reason


@pytest.fixture(scope="module")
def s3_with_iam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An S3 endpoint of its own (its auth is switched on, which the shared one must not see) with
    a bucket holding ok.png, secret.png (denied to the job) and cold.png (DEEP_ARCHIVE); yields
    the job's storage options."""
    import s3fs

    from segment_helpers import write_images

    server = S3Server.start(tmp_path_factory.mktemp("moto-iam"))
    (png,) = write_images(tmp_path_factory.mktemp("png"), ["a.png"])
    admin = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
             "client_kwargs": {"endpoint_url": server.endpoint}}
    try:
        fs = s3fs.S3FileSystem(**admin)
        fs.mkdir("errors-bucket")
        fs.pipe("errors-bucket/ok.png", png.read_bytes())
        fs.pipe("errors-bucket/secret.png", png.read_bytes())
        fs.call_s3("put_object", Bucket="errors-bucket", Key="cold.png", Body=png.read_bytes(),
                   StorageClass="DEEP_ARCHIVE")
        _moto_auth(server, "3")  # from here on requests are checked against IAM, after these 3 set it up
        import boto3

        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        iam.create_user(UserName="job")
        iam.put_user_policy(UserName="job", PolicyName="read-but-not-secret", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::errors-bucket/secret.png"}]}))
        key = iam.create_access_key(UserName="job")["AccessKey"]
        job = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "token": None,
               "skip_instance_cache": True, "client_kwargs": {"endpoint_url": server.endpoint}}
        yield job
    finally:
        server.stop()


def _moto_auth(server: S3Server, free_requests: str) -> None:
    """moto's switch for IAM checks: requests after the next `free_requests` are authorised."""
    req = urllib.request.Request(server.endpoint + "/moto-api/reset-auth", data=free_requests.encode(),
                                 method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).close()


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as e:
        return e
    raise AssertionError("no error raised")


def test_storage_class_and_permission_errors_from_s3_are_permanent(s3_with_iam) -> None:
    import s3fs

    job = s3_with_iam
    fs = s3fs.S3FileSystem(**job)
    assert fs.cat_file("errors-bucket/ok.png")[:4] == b"\x89PNG"  # the job's credentials work
    # what the read stage meets: read_bytes opens (HEAD) then reads (GET)
    cold = _raised(lambda: read_bytes("s3://errors-bucket/cold.png", job))
    assert isinstance(cold, PermissionError)  # s3fs maps InvalidObjectState to PermissionError
    assert classify(cold) == (False, "the object is archived (S3 InvalidObjectState: The operation is not valid "
                                     "for the object's storage class); restore it from Glacier / Deep Archive, "
                                     "or exclude it from the input")
    denied_head = _raised(lambda: read_bytes("s3://errors-bucket/secret.png", job))
    assert isinstance(denied_head, PermissionError)
    # HEAD answers carry no body: the code botocore reports ("403" or "AccessDenied") varies by version
    assert classify(denied_head)[0] is False and re.match(r"access denied \(S3 (403|AccessDenied): ",
                                                          classify(denied_head)[1])
    denied_get = _raised(lambda: fs.call_s3("get_object", Bucket="errors-bucket", Key="secret.png"))
    assert classify(denied_get)[0] is False
    assert classify(denied_get)[1].startswith("access denied (S3 AccessDenied: ")
    assert "grant s3:GetObject" in classify(denied_get)[1]
    bad = _raised(lambda: fs.call_s3(
        "upload_part", Bucket="errors-bucket", Key="k", UploadId="u", PartNumber=10001, Body=b"x"))
    assert classify(bad) == (False, "bad request (S3 InvalidArgument: Part number must be an integer between 1 "
                                    "and 10000, inclusive); check the key and --storage-options")


def test_read_stage_records_archived_and_denied_objects_as_error_rows_without_retrying(s3_with_iam) -> None:
    uris = [f"s3://errors-bucket/{k}" for k in ("ok.png", "cold.png", "secret.png")]
    batch = pa.table({"image_id": ["ok", "cold", "secret"], "uri": uris, "shard_id": ["000000"] * 3})
    out = read_images(batch, s3_with_iam, max_pixels=1 << 20, min_side=1)
    assert out.column("status").to_pylist() == ["ok", "error", "error"]  # final error rows, not "retry"
    assert len(out.column("pixels")[0].as_py()) > 0 and out.column("error").to_pylist()[0] is None
    cold, secret = out.column("error").to_pylist()[1:]
    assert cold.startswith(f"image {uris[1]}: ") and "restore it" in cold  # the cause and the fix, one line
    assert secret.startswith(f"image {uris[2]}: ") and "s3:GetObject" in secret


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

