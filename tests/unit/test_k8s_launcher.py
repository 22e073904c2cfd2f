"""The Kubernetes launcher's manifests, rendered from the shipped templates and checked offline
against the Kubernetes API schema (``kubernetes-validate``, strict: an unknown field fails):
an Indexed Job of ``nnodes`` pods with a headless Service for torchrun's rendezvous, GPUs when
the job asks for them, credentials only from Secrets, and a Kubeflow ``PyTorchJob`` when
configured (its CRD is not in the Kubernetes schema: its pod templates are validated as
``PodTemplate`` objects, its own fields checked here). A fake API client stands in for the
cluster where the launcher submits, watches and deletes."""

from __future__ import annotations

import pathlib
from typing import Any

import kubernetes_validate
import pytest

from clinisynth_server.errors import FailedPrecondition, InvalidArgument
from clinisynth_server.finetune.launchers import (
    KubernetesLauncher,
    LocalLauncher,
    holds_credential,
    k8s_name,
    pytorchjob_running,
    render_template,
)
from clinisynth_server.finetune.records import JobRecord

ROOT = pathlib.Path(__file__).parents[2] / "deploy/k8s"
TEMPLATES = {
    "base": ROOT / "base/finetune/job-template.yaml",
    "prod": ROOT / "overlays/prod/job-template.gpu.yaml",
}
K8S_VERSION = "1.37.0"
IMAGE = "registry.example/clinisynth/services:1.0"


def record(**params: str) -> JobRecord:
    return JobRecord(
        id="ft-abc-123456",
        kind="text_to_image_adaptation",
        dataset="d",
        params=dict(params),
        model_name="m",
        attempt=1,
    )


def validate(doc: dict[str, Any]) -> None:
    """Strict schema validation, failing with the offending path (not the whole schema)."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {where}")


def render(template: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    nproc = kwargs.pop("nproc_per_node", 4)
    params = {k: str(v) for k, v in kwargs.pop("params", {}).items()}
    docs = render_template(
        TEMPLATES[template].read_text(),
        record(**params),
        image=IMAGE,
        nproc_per_node=nproc,
        **kwargs,
    )
    for doc in docs:
        validate(doc)
    return {d["kind"]: d for d in docs}


def worker(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_indexed_job_and_headless_service_validate(template: str) -> None:
    docs = render(template, params={"nnodes": 3})
    assert set(docs) == {"Service", "Job"}
    svc, job = docs["Service"], docs["Job"]
    name = k8s_name("ft-abc-123456", 1)
    assert svc["metadata"]["name"] == job["metadata"]["name"] == name
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 0  # the service owns retries (resume from a checkpoint)
    pod = spec["template"]["spec"]
    # Headless, selecting the Job's pods, which it names <name>-<index>.<name>.
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert pod["subdomain"] == name and pod["restartPolicy"] == "Never"
    c = worker(job)
    assert c["command"] == ["torchrun"]
    assert c["args"] == [
        "--nnodes=3",
        "--nproc-per-node=4",
        f"--master-addr={name}-0.{name}",
        "--master-port=29500",
        "--rdzv-conf=timeout=900",
        "--module",
        "clinisynth_server.finetune.worker",
        "--run-id=ft-abc-123456",
    ]
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env(c)["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == index
    assert {"name": "rendezvous", "port": 29500} in svc["spec"]["ports"]


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_store_credentials_come_from_a_secret(template: str) -> None:
    c = worker(render(template)["Job"])
    for key in ("CLINISYNTH_STORE_ACCESS_KEY", "CLINISYNTH_STORE_SECRET_KEY"):
        entry = env(c)[key]
        assert "value" not in entry
        assert entry["valueFrom"]["secretKeyRef"]["name"] == "clinisynth-store"


def test_a_literal_credential_in_the_template_is_refused(tmp_path: pathlib.Path) -> None:
    text = (
        TEMPLATES["base"]
        .read_text()
        .replace(
            """            - name: CLINISYNTH_STORE_SECRET_KEY
              valueFrom:
                secretKeyRef:
                  name: clinisynth-store
                  key: secret-key""",
            """            - name: CLINISYNTH_STORE_SECRET_KEY
              value: minio-secret-in-clear""",
        )
    )
    assert "minio-secret-in-clear" in text
    with pytest.raises(FailedPrecondition, match="CLINISYNTH_STORE_SECRET_KEY"):
        render_template(text, record(), image=IMAGE, nproc_per_node=1)
    bad = tmp_path / "job-template.yaml"
    bad.write_text(text)
    # Checked when the launcher is made: the service does not start with such a template.
    with pytest.raises(FailedPrecondition, match="literal value"):
        KubernetesLauncher(template_path=str(bad), namespace="ns", image=IMAGE)


def test_credential_names() -> None:
    for name in (
        "CLINISYNTH_STORE_SECRET_KEY",
        "CLINISYNTH_STORE_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "HF_TOKEN",
        "DB_PASSWORD",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "SIGNING_KEY",
    ):
        assert holds_credential(name), name
    for name in ("TOKENIZERS_PARALLELISM", "CLINISYNTH_TRITON_KEY_FILE", "NCCL_DEBUG", "KEYS_DIR"):
        assert not holds_credential(name), name


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_gpus_are_requested_when_the_job_asks(template: str) -> None:
    c = worker(render(template, params={"device": "gpu"}, nproc_per_node=2)["Job"])
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # device=cpu: no GPU held, even where the template asks for them ...
    job = render(template, params={"device": "cpu"})["Job"]
    resources = worker(job)["resources"]
    assert "nvidia.com/gpu" not in {**resources["requests"], **resources["limits"]}
    assert "nvidia.com/gpu.present" not in job["spec"]["template"]["spec"].get("nodeSelector", {})
    # ... and auto keeps the template's own choice (the prod template: a GPU per process).
    auto = worker(render(template, nproc_per_node=4)["Job"])["resources"]["limits"]
    assert auto.get("nvidia.com/gpu") == ("4" if template == "prod" else None)


def test_c10d_rendezvous_settings() -> None:
    job = render("base", params={"nnodes": 2, "rdzv_backend": "c10d", "rdzv_timeout_s": 120})["Job"]
    name = job["metadata"]["name"]
    args = worker(job)["args"]
    assert "--rdzv-backend=c10d" in args
    assert f"--rdzv-endpoint={name}-0.{name}:29500" in args and f"--rdzv-id={name}" in args
    assert "--rdzv-conf=join_timeout=120" in args
    assert not any(a.startswith("--master-addr") for a in args)


@pytest.mark.parametrize("nnodes", [1, 3])
def test_pytorchjob_when_configured(nnodes: int) -> None:
    (doc,) = render_template(
        TEMPLATES["prod"].read_text(),
        record(nnodes=str(nnodes), device="gpu"),
        image=IMAGE,
        nproc_per_node=8,
        api="pytorchjob",
    )
    assert doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "PyTorchJob"
    assert doc["metadata"]["labels"]["clinisynth.io/run-id"] == "ft-abc-123456"
    spec = doc["spec"]
    assert spec["runPolicy"]["backoffLimit"] == 0
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert ("Worker" in replicas) == (nnodes > 1)
    if nnodes > 1:
        assert replicas["Worker"]["replicas"] == nnodes - 1
    for role, replica in replicas.items():
        assert replica["restartPolicy"] == "Never"
        template = replica["template"]
        # The pod template is plain Kubernetes: validate it as a PodTemplate object.
        validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{doc['metadata']['name']}-{role.lower()}"},
                "template": template,
            }
        )
        (c,) = template["spec"]["containers"]
        assert c["name"] == "pytorch"  # the container the operator configures
        assert "subdomain" not in template["spec"] and "PET_NODE_RANK" not in env(c)
        assert c["args"][:5] == [
            f"--nnodes={nnodes}",
            "--nproc-per-node=8",
            "--node-rank=$(RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
        ]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert env(c)["CLINISYNTH_STORE_SECRET_KEY"]["valueFrom"]["secretKeyRef"]


def test_pytorchjob_running_reads_its_conditions() -> None:
    assert pytorchjob_running({})
    running = {"status": {"conditions": [{"type": "Running", "status": "True"}]}}
    assert pytorchjob_running(running)
    done = {"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}}
    assert not pytorchjob_running(done)


class _Status:
    def __init__(self, active: int = 0, succeeded: int = 0, failed: int = 0) -> None:
        self.active, self.succeeded, self.failed = active, succeeded, failed


class _Job:
    def __init__(self, status: _Status) -> None:
        self.status = status


class FakeApi:
    """BatchV1Api + CoreV1Api + CustomObjectsApi: what the launcher calls, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.status = _Status(active=2)
        self.custom_status: dict[str, Any] = {}

    def create_namespaced_service(self, namespace: str, body: dict[str, Any]) -> None:
        self.calls.append(("service", (namespace, body)))

    def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> None:
        self.calls.append(("job", (namespace, body)))

    def create_namespaced_custom_object(self, *args: Any) -> None:
        self.calls.append(("custom", args))

    def read_namespaced_job(self, name: str, namespace: str) -> _Job:
        return _Job(self.status)

    def get_namespaced_custom_object(self, *args: Any) -> dict[str, Any]:
        return {"status": self.custom_status}

    def delete_namespaced_job(self, name: str, namespace: str, **kw: Any) -> None:
        self.calls.append(("delete-job", name))

    def delete_namespaced_service(self, name: str, namespace: str) -> None:
        self.calls.append(("delete-service", name))

    def delete_namespaced_custom_object(self, *args: Any, **kw: Any) -> None:
        self.calls.append(("delete-custom", args[-1]))


@pytest.mark.parametrize("api", ["job", "pytorchjob"])
def test_launch_alive_stop_against_a_fake_cluster(api: str) -> None:
    launcher = KubernetesLauncher(
        template_path=str(TEMPLATES["prod"]), namespace="clinisynth", image=IMAGE, api=api
    )
    fake = FakeApi()
    launcher._api = (fake, fake, fake)
    rec = record(nnodes="2")
    handle = launcher.launch(rec, 4)
    name = k8s_name(rec.id, rec.attempt)
    assert handle["name"] == name and handle["api"] == api
    kinds = [kind for kind, _ in fake.calls]
    if api == "job":
        assert kinds == ["service", "job"]
        assert fake.calls[1][1][1]["spec"]["parallelism"] == 2
    else:
        assert kinds == ["custom"]
        group, version, namespace, plural, body = fake.calls[0][1]
        assert (group, version, namespace, plural) == (
            "kubeflow.org",
            "v1",
            "clinisynth",
            "pytorchjobs",
        )
        assert body["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    rec.worker = handle
    assert launcher.alive(rec) is True
    fake.status = _Status(succeeded=2)
    fake.custom_status = {"conditions": [{"type": "Failed", "status": "True"}]}
    assert launcher.alive(rec) is False
    launcher.stop(rec, 5)
    stops = [c for c in fake.calls if c[0].startswith("delete")]
    assert stops == (
        [("delete-job", name), ("delete-service", name)]
        if api == "job"
        else [("delete-custom", name)]
    )


def test_bad_launcher_settings_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FailedPrecondition, match="K8S_API"):
        KubernetesLauncher(
            template_path=str(TEMPLATES["base"]), namespace="n", image=IMAGE, api="x"
        )
    with pytest.raises(FailedPrecondition, match="not a readable file"):
        KubernetesLauncher(template_path=str(tmp_path / "none.yaml"), namespace="n", image=IMAGE)
    from clinisynth_server.finetune.app import make_launcher, settings_from
    from clinisynth_server.runtime.config import load_config

    config = load_config(
        "finetune",
        env={
            "CLINISYNTH_FINETUNE_LAUNCHER": "kubernetes",
            "CLINISYNTH_FINETUNE_K8S_API": "operator",
            "CLINISYNTH_FINETUNE_JOB_TEMPLATE": str(TEMPLATES["base"]),
        },
    )
    with pytest.raises(InvalidArgument) as err:
        make_launcher(config, settings_from(config))
    assert err.value.violations[0].field == "CLINISYNTH_FINETUNE_K8S_API"


def test_the_local_launcher_runs_one_node(tmp_path: pathlib.Path) -> None:
    launcher = LocalLauncher(env={}, log_dir=tmp_path)
    with pytest.raises(FailedPrecondition, match="nnodes"):
        launcher.launch(record(nnodes="2"), 2)
    assert not list(tmp_path.iterdir())  # nothing started
