"""Every Prometheus metric clinisynth exports, in one place.

Names follow ``clinisynth_<service>_<what>_<unit>``; labels are bounded (service, method, code,
outcome (a status code name), limit (a quota; never the tenant), model, version, condition,
state, kind; ``job`` only for live jobs, removed when they end).
Each service process gets its own registry so several can share a process in tests.
``deploy/prometheus/metrics.yaml`` lists the same catalogue for dashboards and alerts.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from clinisynth_server import __version__

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNIT_BUCKETS = tuple(round(i / 10, 1) for i in range(1, 11))
DISTANCE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class GrpcMetrics:
    requests: Counter
    duration: Histogram
    in_flight: Gauge
    dependency_up: Gauge


@dataclass
class GeneratorMetrics:
    images: Counter
    step_duration: Histogram
    request_duration: Histogram
    queue_depth: Gauge
    batch_size: Histogram
    memorization: Counter


@dataclass
class RewardMetrics:
    score: Histogram
    images_scored: Counter
    feedback: Counter
    feedback_pending: Gauge
    agreement: Gauge


@dataclass
class CounterfactualMetrics:
    duration: Histogram
    flips: Counter
    distance: Histogram


@dataclass
class FinetuneMetrics:
    jobs: Gauge
    job_loss: Gauge
    job_step: Gauge
    checkpoint_time: Gauge
    failures: Counter


@dataclass
class AuditMetrics:
    records: Counter
    failures: Counter


@dataclass
class TlsMetrics:
    reloads: Counter
    expiry: Gauge


@dataclass
class PacsMetrics:
    deliveries: Counter
    pending: Gauge


@dataclass
class ServiceMetrics:
    service: str
    registry: CollectorRegistry
    grpc: GrpcMetrics
    generator: GeneratorMetrics | None = None
    reward: RewardMetrics | None = None
    counterfactual: CounterfactualMetrics | None = None
    finetune: FinetuneMetrics | None = None
    store_corrupt_records: Counter | None = None
    audit: AuditMetrics | None = None
    # Per-tenant quota refusals (runtime/quotas.py); the tenant is not a label (unbounded).
    quota_refusals: Counter | None = None
    pacs: PacsMetrics | None = None  # the PACS outbox (generator, counterfactual)
    tls: TlsMetrics | None = None  # the gRPC port's certificate (runtime/tls.py)


def create_metrics(service: str) -> ServiceMetrics:
    """The registry and metric families of one service."""
    reg = CollectorRegistry()
    info = Gauge(
        "clinisynth_build_info",
        "Build of the running service.",
        ["service", "version"],
        registry=reg,
    )
    info.labels(service, __version__).set(1)
    grpc_m = GrpcMetrics(
        requests=Counter(
            "clinisynth_grpc_requests_total",
            "gRPC calls finished.",
            ["service", "method", "code"],
            registry=reg,
        ),
        duration=Histogram(
            "clinisynth_grpc_request_duration_seconds",
            "gRPC call latency (streams: until the stream ends).",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        in_flight=Gauge(
            "clinisynth_grpc_in_flight_requests",
            "gRPC calls in progress.",
            ["service", "method"],
            registry=reg,
        ),
        dependency_up=Gauge(
            "clinisynth_dependency_up",
            "1 when a dependency answered its last health check.",
            ["service", "dependency"],
            registry=reg,
        ),
    )
    m = ServiceMetrics(service=service, registry=reg, grpc=grpc_m)
    m.store_corrupt_records = Counter(
        "clinisynth_store_corrupt_records_total",
        "Stored records skipped by a listing because they cannot be read.",
        ["service", "namespace"],
        registry=reg,
    )
    m.audit = AuditMetrics(
        records=Counter(
            "clinisynth_audit_records_total",
            "Audit records written, by the outcome (final status code) of the call they record.",
            ["service", "outcome"],
            registry=reg,
        ),
        failures=Counter(
            "clinisynth_audit_failures_total",
            "Audit records that could not be written (the call answered UNAVAILABLE instead).",
            ["service"],
            registry=reg,
        ),
    )
    m.quota_refusals = Counter(
        "clinisynth_quota_refusals_total",
        "Calls refused because a tenant quota was exhausted, by the limit.",
        ["service", "limit"],
        registry=reg,
    )
    m.tls = TlsMetrics(
        reloads=Counter(
            "clinisynth_tls_reloads_total",
            "Changes of the TLS certificate files seen, by outcome (reloaded; failed: the old "
            "certificate kept serving).",
            ["service", "outcome"],
            registry=reg,
        ),
        expiry=Gauge(
            "clinisynth_tls_certificate_expiry_timestamp_seconds",
            "Unix time the served TLS certificate expires (absent without TLS).",
            ["service"],
            registry=reg,
        ),
    )
    if service in ("generator", "counterfactual"):
        m.pacs = PacsMetrics(
            deliveries=Counter(
                "clinisynth_pacs_deliveries_total",
                "PACS outbox delivery attempts of DICOM instances, by outcome "
                "(delivered, retried, failed: given up after the last attempt).",
                ["service", "destination", "outcome"],
                registry=reg,
            ),
            pending=Gauge(
                "clinisynth_pacs_outbox_pending",
                "DICOM instances waiting in the PACS outbox for delivery.",
                ["service", "destination"],
                registry=reg,
            ),
        )
    if service == "generator":
        m.generator = GeneratorMetrics(
            images=Counter(
                "clinisynth_generator_images_total",
                "Images generated.",
                ["model", "version"],
                registry=reg,
            ),
            step_duration=Histogram(
                "clinisynth_generator_step_duration_seconds",
                "One denoising step of one request.",
                ["model"],
                buckets=STEP_BUCKETS,
                registry=reg,
            ),
            request_duration=Histogram(
                "clinisynth_generator_request_duration_seconds",
                "Whole generate request.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=reg,
            ),
            queue_depth=Gauge(
                "clinisynth_generator_queue_depth",
                "Generate requests admitted and not finished.",
                registry=reg,
            ),
            batch_size=Histogram(
                "clinisynth_generator_batch_size",
                "Samples per denoiser call sent to Triton.",
                ["model"],
                buckets=BATCH_BUCKETS,
                registry=reg,
            ),
            memorization=Counter(
                "clinisynth_generator_memorization_total",
                "Memorization-gate outcomes per image (passed, regenerated, flagged, refused, "
                "no_index).",
                ["model", "decision"],
                registry=reg,
            ),
        )
    elif service == "reward":
        m.reward = RewardMetrics(
            score=Histogram(
                "clinisynth_reward_score",
                "Reward scores given.",
                ["model", "version", "generator_model", "generator_version", "condition"],
                buckets=UNIT_BUCKETS,
                registry=reg,
            ),
            images_scored=Counter(
                "clinisynth_reward_images_scored_total",
                "Images scored.",
                ["model", "version"],
                registry=reg,
            ),
            feedback=Counter(
                "clinisynth_reward_feedback_total",
                "Expert judgements stored.",
                ["condition", "label"],
                registry=reg,
            ),
            feedback_pending=Gauge(
                "clinisynth_reward_feedback_pending",
                "Review items still needing judgements.",
                ["condition"],
                registry=reg,
            ),
            agreement=Gauge(
                "clinisynth_reward_rater_agreement_kappa",
                "Inter-rater agreement (Cohen / Fleiss kappa).",
                ["condition"],
                registry=reg,
            ),
        )
    elif service == "counterfactual":
        m.counterfactual = CounterfactualMetrics(
            duration=Histogram(
                "clinisynth_counterfactual_duration_seconds",
                "One counterfactual.",
                buckets=LATENCY_BUCKETS,
                registry=reg,
            ),
            flips=Counter(
                "clinisynth_counterfactual_flips_total",
                "Counterfactuals that reached the target class.",
                ["target"],
                registry=reg,
            ),
            distance=Histogram(
                "clinisynth_counterfactual_distance",
                "Distance of the counterfactual to its input.",
                buckets=DISTANCE_BUCKETS,
                registry=reg,
            ),
        )
    elif service == "finetune":
        m.finetune = FinetuneMetrics(
            jobs=Gauge(
                "clinisynth_finetune_jobs", "Jobs by state.", ["state", "kind"], registry=reg
            ),
            job_loss=Gauge(
                "clinisynth_finetune_job_loss",
                "Latest training loss of live jobs.",
                ["job", "kind"],
                registry=reg,
            ),
            job_step=Gauge(
                "clinisynth_finetune_job_step",
                "Latest step of live jobs.",
                ["job", "kind"],
                registry=reg,
            ),
            checkpoint_time=Gauge(
                "clinisynth_finetune_checkpoint_last_timestamp_seconds",
                "Unix time of a live job's last checkpoint.",
                ["job", "kind"],
                registry=reg,
            ),
            failures=Counter(
                "clinisynth_finetune_job_failures_total",
                "Jobs that failed.",
                ["kind"],
                registry=reg,
            ),
        )
    return m
