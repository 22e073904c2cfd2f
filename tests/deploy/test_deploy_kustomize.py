"""`kubectl kustomize` renders every overlay, and the objects carry what operators rely on:
gRPC probes (over TLS in prod: test_deploy_tls.py), resources, GPUs for Triton in prod,
NetworkPolicies, PDBs, HPAs, finetune RBAC, a Job template that renders into a valid multi-node
torchrun Job, and a Triton that takes no call but health without the key the services read from
a mounted Secret.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import OVERLAYS, by_kind, render
from triton_lockdown import assert_locked_down, effective_command

SERVICES = {"generator": 50051, "reward": 50052, "counterfactual": 50053, "finetune": 50054}
METRICS = {"generator": 9101, "reward": 9102, "counterfactual": 9103, "finetune": 9104}


def _container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_one_namespace(overlay: str) -> None:
    objs = render(overlay)
    ns = {"dev": "clinisynth-dev", "prod": "clinisynth"}[overlay]
    namespaced = [o for o in objs if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {ns}
    assert (
        by_kind(objs, "Namespace")[ns]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        == "restricted"
    )
    for o in objs:
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "clinisynth", o["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_have_grpc_probes_resources_and_hardening(overlay: str) -> None:
    deployments = by_kind(render(overlay), "Deployment")
    for name, port in SERVICES.items():
        d = deployments[name]
        pod = d["spec"]["template"]["spec"]
        c = _container(d, name)
        assert c["args"] == [name]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if overlay == "prod":  # TLS (components/tls): kubelet's gRPC probe cannot speak it
                assert c[probe]["exec"]["command"] == ["clinisynth-healthcheck", name]
            else:
                assert c[probe]["grpc"]["port"] == port, f"{name}.{probe}"
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], name
        assert pod["securityContext"]["runAsNonRoot"] is True
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        env = _env(c)
        assert env[f"CLINISYNTH_{name.upper()}_PORT"] == str(port)
        assert env[f"CLINISYNTH_{name.upper()}_METRICS_PORT"] == str(METRICS[name])
        # secrets only by reference
        assert env["CLINISYNTH_STORE_SECRET_KEY"]["secretKeyRef"]["name"] == "clinisynth-store"
        assert env["CLINISYNTH_AUTH_TOKENS"]["secretKeyRef"]["name"] == "clinisynth-auth"
        ann = d["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/port"] == str(METRICS[name])
    assert deployments["finetune"]["spec"]["strategy"]["type"] == "Recreate"
    reward_ports = {
        p["name"]: p["containerPort"] for p in _container(deployments["reward"], "reward")["ports"]
    }
    assert reward_ports["http"] == 8080


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods(overlay: str) -> None:
    objs = render(overlay)
    deployments = by_kind(objs, "Deployment")
    for name, svc in by_kind(objs, "Service").items():
        if name not in deployments:
            continue
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items(), name
        named = {p["name"] for p in _container(deployments[name], name)["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= named, name


def test_triton_gets_gpus_in_prod_only() -> None:
    prod = _container(by_kind(render("prod"), "Deployment")["triton"], "triton")
    dev = _container(by_kind(render("dev"), "Deployment")["triton"], "triton")
    assert prod["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert prod["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in dev["resources"]["limits"]
    pod = by_kind(render("prod"), "Deployment")["triton"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for c in (prod, dev):
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert "--model-control-mode=explicit" in c["args"] and "--load-model=*" in c["args"]


def test_store_is_in_namespace_for_dev_and_external_for_prod() -> None:
    dev, prod = render("dev"), render("prod")
    assert "minio" in by_kind(dev, "StatefulSet") and "minio-init" in by_kind(dev, "Job")
    assert not by_kind(prod, "StatefulSet")
    dev_cfg = by_kind(dev, "ConfigMap")["clinisynth-config"]["data"]
    prod_cfg = by_kind(prod, "ConfigMap")["clinisynth-config"]["data"]
    assert dev_cfg["CLINISYNTH_STORE_ENDPOINT"] == "minio:9000"
    assert prod_cfg["CLINISYNTH_STORE_SECURE"] == "true"
    assert prod_cfg["TRITON_MODEL_REPOSITORY"].startswith("s3://https://")
    # prod bakes in no secret; dev's are generated from placeholder files
    assert not by_kind(prod, "Secret")
    assert set(by_kind(dev, "Secret")) == {
        "minio-root",
        "clinisynth-store",
        "clinisynth-auth",
        "clinisynth-triton-key",
        "clinisynth-triton-store",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_for_generator_and_reward_on_request_rate(overlay: str) -> None:
    hpas = by_kind(render(overlay), "HorizontalPodAutoscaler")
    assert set(hpas) == {"generator", "reward"}
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        pods_metrics = [
            m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
        ]
        assert "clinisynth_grpc_requests_per_second" in pods_metrics
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if overlay == "prod":
        assert all(h["spec"]["minReplicas"] >= 2 for h in hpas.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_cover_every_component(overlay: str) -> None:
    objs = render(overlay)
    pdbs = by_kind(objs, "PodDisruptionBudget")
    for name, d in by_kind(objs, "Deployment").items():
        pod_labels = d["spec"]["template"]["metadata"]["labels"].items()
        (pdb,) = [
            p for p in pdbs.values() if p["spec"]["selector"]["matchLabels"].items() <= pod_labels
        ]
        replicas = d["spec"].get("replicas", 1)
        if overlay == "prod" and name != "finetune":
            assert replicas >= 2, f"{name}: a PDB cannot keep a single replica up"
        assert pdb["spec"]["maxUnavailable"] == 1


def _allows(policy: dict[str, Any], direction: str) -> list[dict[str, Any]]:
    return policy["spec"].get(direction, [])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_default_deny_and_open_only_needed_paths(overlay: str) -> None:
    pols = by_kind(render(overlay), "NetworkPolicy")
    deny = pols["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    # nothing is opened to everyone: every ingress rule names its peers
    for name, pol in pols.items():
        for rule in _allows(pol, "ingress"):
            assert rule.get("from"), f"{name}: ingress open to all sources"
    # triton only takes traffic from clinisynth components
    (grpc_rule, _) = _allows(pols["triton-ingress-from-services"], "ingress")
    peers = grpc_rule["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert set(peers) == {"generator", "reward", "counterfactual", "finetune", "finetune-worker"}
    assert grpc_rule["ports"] == [{"protocol": "TCP", "port": 8001}]
    store = _allows(pols["egress-to-store"], "egress")[0]["to"][0]
    if overlay == "prod":
        assert store["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "clinisynth-store"
        }
    else:
        assert store["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "minio"}
        assert "minio-ingress" in pols
    metrics = _allows(pols["metrics-from-monitoring"], "ingress")[0]
    assert metrics["ports"] == [{"protocol": "TCP", "port": "metrics"}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_finetune_can_launch_jobs_and_nothing_more(overlay: str) -> None:
    objs = render(overlay)
    role = by_kind(objs, "Role")["finetune-launcher"]
    verbs = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert {"create", "watch", "delete"} <= verbs[("batch", "jobs")]
    assert "create" in verbs[("", "services")]
    assert all("*" not in v for v in verbs.values()) and ("", "secrets") not in verbs
    binding = by_kind(objs, "RoleBinding")["finetune-launcher"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": "finetune",
            "namespace": binding["metadata"]["namespace"],
        }
    ]
    sas = by_kind(objs, "ServiceAccount")
    assert sas["finetune"]["automountServiceAccountToken"] is True
    assert all(
        sa["automountServiceAccountToken"] is False for n, sa in sas.items() if n != "finetune"
    )


def _render_job_template(overlay: str, nnodes: int, nproc: int) -> list[dict[str, Any]]:
    objs = render(overlay)
    finetune = _container(by_kind(objs, "Deployment")["finetune"], "finetune")
    env = _env(finetune)
    # hash-suffixed: a changed template rolls the finetune pod, which mounts it
    (cm,) = [
        c for n, c in by_kind(objs, "ConfigMap").items() if n.startswith("finetune-job-template-")
    ]
    volumes = by_kind(objs, "Deployment")["finetune"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "job-template", "configMap": {"name": cm["metadata"]["name"]}} in volumes
    template = cm["data"]["job-template.yaml"]
    assert env["CLINISYNTH_FINETUNE_JOB_TEMPLATE"] == "/etc/clinisynth/finetune/job-template.yaml"
    # the worker image follows the overlay's `images:` (kustomize replacements)
    assert env["CLINISYNTH_FINETUNE_WORKER_IMAGE"] == finetune["image"]
    text = string.Template(template).substitute(
        NAME="ft-run-0042", RUN_ID="run-0042", KIND="generator", IMAGE=finetune["image"],
        NNODES=str(nnodes), NPROC_PER_NODE=str(nproc),
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_template_renders_a_multi_node_torchrun_job(overlay: str) -> None:
    svc, job = _render_job_template(overlay, nnodes=2, nproc=4)
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] == "ft-run-0042"
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": "ft-run-0042"}
    assert pod["serviceAccountName"] == "finetune-worker" and pod["restartPolicy"] == "Never"
    (worker,) = pod["containers"]
    assert worker["command"] == ["torchrun"]
    assert "--nnodes=2" in worker["args"] and "--nproc-per-node=4" in worker["args"]
    assert "--master-addr=ft-run-0042-0.ft-run-0042" in worker["args"]
    rank = _env(worker)["PET_NODE_RANK"]["fieldRef"]["fieldPath"]
    assert rank == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    labels = spec["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "finetune-worker"  # NetworkPolicy mesh
    gpus = worker["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == ("4" if overlay == "prod" else None)


def test_base_renders_too() -> None:
    from deploy_helpers import DEPLOY, require, run

    out = run([require("kubectl"), "kustomize", str(DEPLOY / "k8s" / "base")])
    kinds = {d["kind"] for d in yaml.safe_load_all(out) if d}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Role",
    } <= kinds


# --- Triton's restricted protocols (issue #14) -------------------------------------------------

TRITON_KEY_SECRET = "clinisynth-triton-key"
DEPLOYMENTS = (*SERVICES, "triton")


def _pod(deploy: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = deploy["spec"]["template"]["spec"]
    return pod


def _secret_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> str | None:
    """``"secret/key"`` when ``path`` is a file of a Secret volume mounted in ``container``."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        secret = volumes[mount["name"]].get("secret")
        if secret is None or not path.startswith(directory) or "subPath" in mount:
            continue
        name = path[len(directory) :]
        items = {i["path"]: i["key"] for i in secret.get("items", [])} or {name: name}
        if name in items:
            return f"{secret['secretName']}/{items[name]}"
    return None


def _dev_secret_keys() -> dict[str, set[str]]:
    return {n: set(s.get("data", {})) for n, s in by_kind(render("dev"), "Secret").items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_restricts_every_group_but_health_with_the_mounted_key(
    overlay: str, tmp_path: Path
) -> None:
    """What the image's entrypoint execs for the rendered args: both restriction flags, every
    group Triton has but health, the key read from a file of the mounted key Secret."""
    deploy = by_kind(render(overlay), "Deployment")["triton"]
    pod, triton = _pod(deploy), _container(deploy, "triton")
    assert "command" not in triton, "the image's entrypoint must run (it adds the flags)"
    (key_arg,) = [a for a in triton["args"] if a.startswith("--restricted-key-file=")]
    key_path = key_arg.split("=", 1)[1]
    assert _secret_file(pod, triton, key_path) == f"{TRITON_KEY_SECRET}/key"
    command, _, values = effective_command(
        triton["args"], lambda p: _secret_file(pod, triton, p), tmp_path
    )
    assert_locked_down(command, values[key_path])
    assert "--model-control-mode=explicit" in command and "--load-model=*" in command
    if overlay == "dev":
        assert "key" in _dev_secret_keys()[TRITON_KEY_SECRET]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_reads_the_triton_key_from_the_mounted_secret(overlay: str) -> None:
    deployments = by_kind(render(overlay), "Deployment")
    for name in SERVICES:
        pod, c = _pod(deployments[name]), _container(deployments[name], name)
        path = _env(c).get("CLINISYNTH_TRITON_KEY_FILE")
        assert isinstance(path, str), f"{name}: CLINISYNTH_TRITON_KEY_FILE is not a plain path"
        assert _secret_file(pod, c, path) == f"{TRITON_KEY_SECRET}/key", name
    # the same file Triton is started with
    triton = _container(deployments["triton"], "triton")
    assert f"--restricted-key-file={path}" in triton["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_triton_key_is_mounted_as_a_file_and_never_in_an_environment(overlay: str) -> None:
    """Triton and the four services mount the key Secret; no container anywhere (training
    workers included) gets it through env or envFrom."""
    objs = render(overlay)
    _, job = _render_job_template(overlay, nnodes=1, nproc=1)
    pods = {n: _pod(d) for n, d in by_kind(objs, "Deployment").items()}
    for o in objs:
        if o["kind"] in ("Job", "StatefulSet"):
            pods[f"{o['kind']}/{o['metadata']['name']}"] = o["spec"]["template"]["spec"]
    pods["finetune-worker"] = job["spec"]["template"]["spec"]
    mounted_by = set()
    for owner, pod in pods.items():
        keyed = {
            v["name"]
            for v in pod.get("volumes", [])
            if v.get("secret", {}).get("secretName") == TRITON_KEY_SECRET
        }
        for c in pod["containers"] + pod.get("initContainers", []):
            if any(m["name"] in keyed and m.get("readOnly") for m in c.get("volumeMounts", [])):
                mounted_by.add(owner)
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {})
                assert ref.get("name") != TRITON_KEY_SECRET, f"{c['name']}: {e['name']}"
            for src in c.get("envFrom", []):
                assert src.get("secretRef", {}).get("name") != TRITON_KEY_SECRET, c["name"]
    assert mounted_by == set(DEPLOYMENTS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_gets_no_token_or_credential_in_its_environment(
    overlay: str, tmp_path: Path
) -> None:
    """No secret reference, no secret-looking name (the launcher's pattern) and no envFrom
    that could bring one; the store is read with Triton's own user from mounted files."""
    from clinisynth_server.triton.launcher import _ENV_SECRET

    objs = render(overlay)
    configmaps = by_kind(objs, "ConfigMap")
    deploy = by_kind(objs, "Deployment")["triton"]
    pod, triton = _pod(deploy), _container(deploy, "triton")
    for e in triton.get("env", []):
        assert "secretKeyRef" not in e.get("valueFrom", {}), e["name"]
        assert not _ENV_SECRET.search(e["name"]) and not e["name"].startswith("AWS_"), e["name"]
    for src in triton.get("envFrom", []):
        assert "secretRef" not in src, src
        data = configmaps[src["configMapRef"]["name"]].get("data", {})
        assert not [k for k in data if _ENV_SECRET.search(k)], src
    # an s3:// repository is read with the read-only user's files, not the services' Secret
    store = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in triton["args"] if "-key-file=" in a}
    assert _secret_file(pod, triton, store["--s3-access-key-file"]) == (
        "clinisynth-triton-store/access-key"
    )
    assert _secret_file(pod, triton, store["--s3-secret-key-file"]) == (
        "clinisynth-triton-store/secret-key"
    )
    volumes = [v.get("secret", {}).get("secretName") for v in pod["volumes"]]
    assert not {"clinisynth-store", "clinisynth-auth"} & set(volumes)
    _, env, values = effective_command(
        triton["args"], lambda p: _secret_file(pod, triton, p), tmp_path
    )
    creds = Path(env["TRITON_CLOUD_CREDENTIAL_PATH"])
    assert values[store["--s3-secret-key-file"]] in creds.read_text()
    if overlay == "dev":
        assert {"access-key", "secret-key"} <= _dev_secret_keys()["clinisynth-triton-store"]
        init = by_kind(objs, "Job")["minio-init"]["spec"]["template"]["spec"]["containers"][0]
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in init["env"] if "valueFrom" in e}
        assert "clinisynth-triton-store" in refs
        assert "clinisynth-models-ro" in init["args"][0]
