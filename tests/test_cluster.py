"""cluster.yaml and the KubeRay manifests (k8s/), offline: Ray's own autoscaler validation
(no AWS call, no boto3), the Kubernetes API's models for every pod, service and volume
field, KubeRay's fields against its CRD, and what issue 15 asks of them — a CPU head and GPU
workers from zero, a spot option with retries a reclaim cannot use up, a current GPU AMI, a
working EFS mount that only the cluster's user may write, a durable MLflow server behind
auth, Ray's token auth, the project's image, nothing synced that `ray up` should not hash —
and nothing that does not belong in them (secrets, experiment settings)."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib

import pytest
import yaml

from tests.conftest import REPO

CLUSTER = REPO / "cluster.yaml"
K8S = REPO / "k8s"
DOCS = REPO / "docs" / "cluster.md"
#: AWS's public SSM parameter of the Deep Learning Base OSS NVIDIA Driver GPU AMI.
AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def commands(raw: dict, *sections: str) -> str:
    return "\n".join(c for s in sections for c in raw.get(s) or [])


def test_cluster_yaml_passes_rays_own_validation(raw):
    # Private autoscaler API: the calls `ray up` makes before it talks to AWS (ray is pinned).
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(raw)
    validate_config(config)
    # Ray checks file_mounts sources only when it hashes them; they are relative to where
    # `ray up` runs (the repository root), except the token each user makes locally.
    for target, source in config["file_mounts"].items():
        if source == "~/.ray/auth_token":
            assert target == source
        else:
            assert (REPO / source).exists(), source


def test_ray_up_hashes_and_syncs_no_git_venv_or_results(raw):
    # `ray up` walks every file of every source to hash it (rsync_exclude does not apply to
    # the hash): this is the walk of ray.autoscaler._private.util.hash_runtime_conf.
    walked = []
    for source in raw["file_mounts"].values():
        path = REPO / source
        if source.startswith("~") or path.is_file():
            walked.append(source)
            continue
        for folder, _, files in os.walk(path):
            walked += [os.path.join(folder, f) for f in files]
    assert walked
    for bad in (".git", ".venv", "bdat_results", "mlflow.db", "mlruns", "mlartifacts"):
        assert not [w for w in walked if bad in w.split(os.sep)], bad


def test_cpu_head_and_autoscaling_gpu_workers_with_a_spot_option(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    assert all(t["min_workers"] == 0 for t in workers.values())
    markets = [t["node_config"].get("InstanceMarketOptions", {}) for t in workers.values()]
    assert any(m.get("MarketType") == "spot" for m in markets)


def test_a_spot_reclaim_never_uses_up_a_trials_retries():
    from bdat_ray import sweep, tracking

    assert sweep.MAX_FAILURES == -1  # Tune counts reclaimed nodes; the trial bounds itself
    assert 0 < tracking.ERROR_RETRIES < tracking.MAX_ATTEMPTS
    text = CLUSTER.read_text()
    assert "retries without limit" in text and "no trial starts more than 20 times" in text
    assert tracking.MAX_ATTEMPTS == 20 and tracking.ERROR_RETRIES == 2  # as the file says


def test_every_node_boots_the_current_gpu_ami_from_its_ssm_parameter(raw):
    for name, node_type in raw["available_node_types"].items():
        image = node_type["node_config"]["ImageId"]
        assert image == f"resolve:ssm:{AMI_PARAMETER}/latest/ami-id", name
    assert AMI_PARAMETER in DOCS.read_text()  # how to pin (and refresh) one id


def test_the_project_image_built_from_the_pinned_ray_gpu_image(raw):
    import ray

    dockerfile = (REPO / "Dockerfile").read_text()
    (base,) = re.findall(r"(?m)^FROM\s+(\S+)", dockerfile)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"  # Ray's tag format
    assert "ray-ml" not in base  # no longer published
    # Dependencies come from pyproject.toml (no second list of pins), with the cluster extra.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    installs = re.findall(r"pip install [^\n&]*", dockerfile)
    assert any("-e '.[cluster]'" in line for line in installs), installs
    assert not re.search(r"pip install[^\n]*==", dockerfile)
    assert any(d.startswith("mlflow[auth]") for d in extras["cluster"])
    assert any(d.startswith("boto3") for d in extras["aws"])
    # Every node runs it; setup installs only the synced code over it.
    assert raw["docker"]["image"].endswith("/bdat-ray:0.1.0")
    assert "pip install -q --no-deps -e ~/bdat_ray" in raw["setup_commands"]


def test_efs_mount_works_and_only_the_cluster_user_may_write(raw):
    init = commands(raw, "initialization_commands")
    assert "nfs-common" in init
    assert re.search(r"mount -t nfs4 -o nfsvers=4.1,\S*noresvport", init)
    assert "chmod 700 /mnt/efs/bdat_ray" in init and "chown 1000:1000" in init
    assert "777" not in CLUSTER.read_text()
    rules = raw["provider"]["security_group"]["IpPermissions"]
    assert any(r["FromPort"] <= 2049 <= r["ToPort"] and r["IpProtocol"] == "tcp" for r in rules)
    zones = raw["provider"]["availability_zone"].split(",")
    docs = DOCS.read_text()
    assert "create-mount-target" in docs and all(z in docs for z in zones)
    assert any("/mnt/efs/bdat_ray:/mnt/shared" in o for o in raw["docker"]["run_options"])


def test_ray_token_auth_on_every_node(raw):
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "export RAY_AUTH_MODE=token" in commands(raw, "setup_commands")
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[section] if "ray start" in c]
        assert start and all(c.startswith(". ~/bdat_ray.env && ") for c in start)
    assert "--dashboard-host=127.0.0.1" in commands(raw, "head_start_ray_commands")


def test_mlflow_server_is_durable_and_behind_basic_auth(raw):
    start = commands(raw, "head_start_ray_commands")
    assert "mlflow server --app-name basic-auth" in start
    assert "--workers 1" in start  # one SQLite writer
    assert '"${BDAT_MLFLOW_BACKEND:-sqlite:////mnt/shared/mlflow/mlflow.db}"' in start
    assert '"${BDAT_MLFLOW_ARTIFACTS:-/mnt/shared/mlflow/artifacts}"' in start
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in start


def test_the_environment_every_ray_process_gets(raw, tmp_path):
    # Run the setup commands that write ~/bdat_ray.env in a scratch home, then read it back
    # the way `ray start` and login shells do.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("tok-123")
    (home / ".bashrc").write_text("")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    for command in raw["setup_commands"][2:] + raw["head_setup_commands"]:
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    assert ". ~/bdat_ray.env" in (home / ".bashrc").read_text()
    shown = subprocess.run(
        ["bash", "-c", ". ~/bdat_ray.env && env"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    values = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert values["RAY_AUTH_MODE"] == "token"
    assert values["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert values["MLFLOW_TRACKING_PASSWORD"] == "tok-123"
    assert values["BDAT_RAY_CACHE"] == "/mnt/shared/cache"
    assert re.fullmatch(r"http://[0-9a-f.:]+:5000", values["MLFLOW_TRACKING_URI"])


def test_no_secrets_and_no_experiment_settings():
    for path in [CLUSTER, *K8S.glob("*.yaml")]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path  # AWS access key ids
        # A literal value after a secret's name; reading it from a file or variable is fine.
        assert not re.search(r"(?i)(secret|password|token)\s*[:=]\s*['\"]?[\w+/-]{6,}", text)
        assert not re.search(r"(?m)^\s*(at|attack|train|data|model)\.[a-z_]+\s*:", text), path


# ---------------------------------------------------------------------------------------------
# KubeRay.

#: KubeRay's RayCluster fields used here, as its CRD defines them
#: (ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayclusters.yaml: spec.properties
#: and the head/worker group properties). The pod templates inside are checked against the
#: Kubernetes API's own models (the `kubernetes` client package).
RAYCLUSTER_FIELDS = {
    "spec": {
        "rayVersion",
        "enableInTreeAutoscaling",
        "autoscalerOptions",
        "headGroupSpec",
        "workerGroupSpecs",
    },
    "autoscalerOptions": {"upscalingMode", "idleTimeoutSeconds", "resources", "image"},
    "headGroupSpec": {"rayStartParams", "template", "serviceType", "enableIngress"},
    "workerGroupSpecs": {
        "groupName",
        "replicas",
        "minReplicas",
        "maxReplicas",
        "rayStartParams",
        "template",
    },
}
UPSCALING_MODES = {"Default", "Aggressive"}


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    docs = [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text())]
    assert docs and all(isinstance(d, dict) for d in docs)
    return docs


def check_k8s_fields(value, type_name: str, where: str) -> None:
    """Every key of ``value`` is a field of the Kubernetes model ``type_name``, recursively
    (list[...] and dict(str, ...) included)."""
    from kubernetes import client

    if type_name.startswith("list["):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            check_k8s_fields(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("dict("):
        assert isinstance(value, dict), where
        inner = type_name[5:-1].split(", ", 1)[1]
        for key, item in value.items():
            check_k8s_fields(item, inner, f"{where}.{key}")
        return
    model = getattr(client, type_name, None)
    if model is None:  # str, int, bool, object
        return
    assert isinstance(value, dict), f"{where}: expected a {type_name} mapping"
    fields = {json: model.openapi_types[py] for py, json in model.attribute_map.items()}
    for key, item in value.items():
        assert key in fields, f"{where}.{key}: no such field in {type_name}"
        check_k8s_fields(item, fields[key], f"{where}.{key}")


def test_kubernetes_objects_name_only_fields_that_exist(manifests):
    models = {
        "PersistentVolumeClaim": "V1PersistentVolumeClaim",
        "Deployment": "V1Deployment",
        "Service": "V1Service",
    }
    kinds = [d["kind"] for d in manifests]
    assert sorted(kinds) == ["Deployment", "PersistentVolumeClaim", "RayCluster", "Service"]
    for doc in manifests:
        if doc["kind"] in models:
            check_k8s_fields(doc, models[doc["kind"]], doc["kind"])


def test_raycluster_names_only_kuberay_fields_and_valid_pods(manifests):
    import ray

    (cluster,) = [d for d in manifests if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_FIELDS["spec"]
    assert set(spec["autoscalerOptions"]) <= RAYCLUSTER_FIELDS["autoscalerOptions"]
    assert spec["autoscalerOptions"]["upscalingMode"] in UPSCALING_MODES
    assert set(spec["headGroupSpec"]) <= RAYCLUSTER_FIELDS["headGroupSpec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    check_k8s_fields(spec["headGroupSpec"]["template"], "V1PodTemplateSpec", "head.template")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no trials on the head
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= RAYCLUSTER_FIELDS["workerGroupSpecs"]
        check_k8s_fields(group["template"], "V1PodTemplateSpec", group["groupName"])
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(group)
    assert gpu_groups and all(g["minReplicas"] == 0 < g["maxReplicas"] for g in gpu_groups)


def test_manifests_share_the_image_the_server_and_the_volume(raw, manifests):
    pods = [d["spec"]["template"]["spec"] for d in manifests if d["kind"] == "Deployment"]
    (cluster,) = [d for d in manifests if d["kind"] == "RayCluster"]
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    pods += [g["template"]["spec"] for g in groups]
    images = {c["image"] for pod in pods for c in pod["containers"]}
    assert images == {raw["docker"]["image"]}  # the image ./Dockerfile builds
    (claim,) = [d["metadata"]["name"] for d in manifests if d["kind"] == "PersistentVolumeClaim"]
    (service,) = [d for d in manifests if d["kind"] == "Service"]
    for pod in pods:
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == [claim]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in pod["containers"][0][
            "volumeMounts"
        ]
    for group in groups:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        port = service["spec"]["ports"][0]["port"]
        assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://{service['metadata']['name']}:{port}"
        assert env["BDAT_RAY_CACHE"]["value"].startswith("/mnt/shared/")
    # Every secret key a pod needs is one the docs' `kubectl create secret` makes.
    docs = DOCS.read_text()
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for pod in pods
        for c in pod["containers"]
        for e in c["env"]
        if "valueFrom" in e
    ]
    for ref in refs:
        assert ref["name"] == "bdat-ray"
        if not ref.get("optional"):
            assert f"--from-literal={ref['key']}=" in docs, ref["key"]
