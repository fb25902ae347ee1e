import os

# Keep torch from oversubscribing the 2-core CI machine when Ray workers run beside pytest.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from fixtures_infra import RayHead, S3Server  # noqa: E402


@pytest.fixture(scope="module")
def model():
    """A random narrow InstanceFCN with louder score/objectness heads than the init: masks with
    structure instead of all ~0.5 (seeded, so every run sees the same)."""
    import torch

    from ifcn import InstanceFCN, ModelConfig

    torch.manual_seed(0)
    model = InstanceFCN(ModelConfig("vgg16_narrow")).eval()
    torch.nn.init.normal_(model.score_head[-1].weight, std=0.5)
    torch.nn.init.normal_(model.objectness_head[-1].weight, std=0.5)
    return model


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 HTTP endpoint (moto server) on loopback for the whole session.

    Sets AWS_* credentials, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL in this process's
    environment, so s3fs here and any subprocess (CLI runs, Ray workers started later)
    reach it without storage options.
    """
    import s3fs

    server = S3Server.start(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()  # instances made before would point at AWS
        try:
            yield server
        finally:
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket: 's3://test-<random>' (no trailing slash)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """A real Ray head node (GCS, raylet, dashboard + job API) with 2 CPUs, stopped by pid."""
    head = RayHead.start(num_cpus=2)
    try:
        yield head
    finally:
        head.stop()
