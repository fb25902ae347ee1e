"""ray_cluster.yaml against Ray's own cluster-config schema and checks; k8s/rayjob.yaml's shape.

No cloud is reached: the launcher config is validated the way `ray up` validates it before
it talks to AWS, and the RayJob's entrypoint is parsed by the real jobs.segment parser.
"""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from jobs.segment import parser as segment_parser

REPO = Path(__file__).resolve().parents[1]
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())


def validate(config: dict) -> None:
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))


def test_cluster_config_matches_rays_schema(cluster):
    validate(cluster)
    # Ray's own checks as `ray up` runs them: fill the AWS provider's defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(availble_node_types={}),  # typo'd top-level key
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="1"),  # string count
    lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
])
def test_schema_rejects_broken_variants(cluster, mutate):
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_cluster_has_aws_cpu_head_and_autoscaling_gpu_workers(cluster):
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1 and name != cluster["head_node_type"]]
    assert len(gpu) == 1
    (gpu,) = gpu
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))
    assert cluster["max_workers"] >= gpu["max_workers"]
    assert "IamInstanceProfile" in gpu["node_config"]  # workers read S3 with an instance profile


def test_cluster_installs_this_project_and_pins_the_client_ray(cluster):
    mounts = cluster["file_mounts"]
    remote = next(r for r, local in mounts.items() if local == ".")
    setup = " ".join(cluster["setup_commands"])
    assert f"pip install -q -e {remote}" in setup
    assert f'"ray[default,data]=={ray.__version__}"' in setup  # same Ray as the submitting client
    starts = " ".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    assert starts.count("--object-store-memory=") == 2 and starts.count("RAY_AUTH_MODE=token") == 2


def test_rayjob_runs_the_segment_job(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.segment"]
    args = segment_parser().parse_args(argv[3:])  # flags the real CLI accepts
    assert args.input.startswith("s3://") and args.output.startswith("s3://") and args.gpus_per_actor == 1
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1 and gpu["rayStartParams"]["num-gpus"] == "1"
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert args.actors <= gpu["maxReplicas"]
