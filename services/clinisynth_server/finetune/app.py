"""Wiring of the finetune service: store, catalog, Triton, launcher, scheduler, servicer.

Settings (``CLINISYNTH_FINETUNE_<KEY>`` or the ``[finetune]`` table of the config file):
``max_concurrent_jobs`` (1), ``max_restarts`` (3), ``heartbeat_timeout_s`` (120),
``model_repository`` (else ``CLINISYNTH_MODEL_REPOSITORY``), ``launcher`` (local | kubernetes),
``workdir`` (workers' local scratch), ``nproc_per_node`` (1), ``job_template``, ``namespace``,
``worker_image``, ``k8s_api`` (kubernetes launcher: ``job`` = an Indexed Job + headless Service,
``pytorchjob`` = a Kubeflow PyTorchJob, ``auto`` = a PyTorchJob when the cluster serves
``kubeflow.org/v1``), ``torch_threads`` (CPU threads per local worker; 0 = torch's
default), ``heartbeat_s`` (workers' heartbeat period), ``allow_pickle_weights`` (false: imported
model folders must hold safetensors; true admits ``.bin`` weights, loaded with ``weights_only``).
Quotas (``concurrent_jobs`` per tenant): the ``[quotas]`` tables of the config file
(:mod:`~clinisynth_server.runtime.quotas`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence

import grpc

from clinisynth.v1 import finetune_pb2, finetune_pb2_grpc
from clinisynth_server.catalog import Catalog
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.finetune.imports import ImportSettings, ModelImports
from clinisynth_server.finetune.launchers import K8S_APIS, KubernetesLauncher, LocalLauncher
from clinisynth_server.finetune.service import FinetuneService, Settings
from clinisynth_server.finetune.servicer import FinetuneServicer
from clinisynth_server.runtime.config import ServiceConfig, default_home
from clinisynth_server.runtime.dependencies import Dependencies
from clinisynth_server.runtime.metrics import ServiceMetrics
from clinisynth_server.runtime.quotas import Quotas, load_quotas

SERVICE_NAME = finetune_pb2.DESCRIPTOR.services_by_name["FinetuneService"].full_name


def settings_from(config: ServiceConfig) -> Settings:
    def num(key: str, default: float, kind: type = int) -> float:
        raw = config.get(key, "")
        try:
            return kind(raw) if raw else default
        except ValueError as exc:
            raise InvalidArgument.for_field(
                f"CLINISYNTH_FINETUNE_{key.upper()}", f"not a number: {raw!r}"
            ) from exc

    return Settings(
        max_concurrent_jobs=max(1, int(num("max_concurrent_jobs", 1))),
        max_restarts=int(num("max_restarts", 3)),
        heartbeat_timeout_s=float(num("heartbeat_timeout_s", 120.0, float)),
        poll_s=float(num("poll_s", 0.5, float)),
        stop_grace_s=float(num("stop_grace_s", 10.0, float)),
        nproc_per_node=max(1, int(num("nproc_per_node", 1))),
        model_repository=config.get("model_repository")
        or os.environ.get("CLINISYNTH_MODEL_REPOSITORY", ""),
    )


def make_launcher(config: ServiceConfig, settings: Settings) -> LocalLauncher | KubernetesLauncher:
    kind = config.get("launcher", "local")
    if kind == "kubernetes":
        api = config.get("k8s_api", "job") or "job"
        if api not in K8S_APIS:
            raise InvalidArgument.for_field(
                "CLINISYNTH_FINETUNE_K8S_API", f"one of {', '.join(K8S_APIS)}, not {api!r}"
            )
        return KubernetesLauncher(
            template_path=config.get("job_template"),
            namespace=config.get("namespace"),
            image=config.get("worker_image", "clinisynth/services"),
            api=api,
        )
    if kind != "local":
        raise InvalidArgument.for_field("CLINISYNTH_FINETUNE_LAUNCHER", "local or kubernetes")
    workdir = pathlib.Path(config.get("workdir") or default_home() / "finetune-work")
    env = {
        "CLINISYNTH_FINETUNE_STORE_URL": config.store_url,
        "CLINISYNTH_FINETUNE_WORKDIR": str(workdir),
        "CLINISYNTH_MODEL_REPOSITORY": settings.model_repository,
        "CLINISYNTH_FINETUNE_LOG_FORMAT": config.log_format,
        "CLINISYNTH_FINETUNE_LOG_LEVEL": config.log_level,
    }
    for key in ("heartbeat_s", "torch_threads"):
        if config.get(key) not in ("", "0"):
            env[f"CLINISYNTH_FINETUNE_{key.upper()}"] = config.get(key)
    # Several CPU workers must not oversubscribe the cores.
    if config.get("torch_threads") not in ("", "0"):
        env["OMP_NUM_THREADS"] = config.get("torch_threads")
    return LocalLauncher(env=env, log_dir=workdir / "logs")


def create(config: ServiceConfig) -> Callable[[grpc.Server, ServiceMetrics], Sequence[str]]:
    def register(server: grpc.Server, metrics: ServiceMetrics) -> Sequence[str]:
        deps = Dependencies.open(config, metrics)
        settings = settings_from(config)
        service = FinetuneService(
            deps.store,
            Catalog(deps.store, metrics=metrics),
            deps.triton,
            make_launcher(config, settings),
            settings,
            metrics.finetune,
            Quotas(
                load_quotas(config.config_file),
                service=config.service,
                refusals=metrics.quota_refusals,
            ),
        )
        service.start()
        # an attribute on the function (mypy types functions without attributes): for tests
        register.service = service  # type: ignore[attr-defined]
        pickle = config.get("allow_pickle_weights", "false").strip().lower()
        if pickle not in ("true", "false", "1", "0", ""):
            raise InvalidArgument.for_field(
                "CLINISYNTH_FINETUNE_ALLOW_PICKLE_WEIGHTS", f"true or false, not {pickle!r}"
            )
        models = ModelImports(
            deps.store,
            service.catalog,
            deps.triton,
            ImportSettings(settings.model_repository, allow_pickle_weights=pickle in ("true", "1")),
        )
        finetune_pb2_grpc.add_FinetuneServiceServicer_to_server(
            FinetuneServicer(service, models), server
        )
        return [SERVICE_NAME]

    return register
