"""Build clinisynth's Grafana dashboards as provisioned JSON.

Why a script: three dashboards with ~40 panels are easier to review and keep consistent (grid
layout, datasource, units, legends) as Python than as hand-edited JSON. The JSON it writes is
committed under deploy/grafana/dashboards/ and provisioned by Grafana; tests/deploy checks that the
committed files equal this script's output and that every query only uses catalogued metrics.

Run: python deploy/grafana/build_dashboards.py            (rewrites the JSON files)
     python deploy/grafana/build_dashboards.py --check    (exit 1 when they are stale)
"""

# PromQL queries stay on one line each so they can be pasted into Prometheus as they are.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
GRID_W = 24

Panel = dict[str, Any]


class Grid:
    """Places panels left to right, wrapping rows, so callers only give widths and heights."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, panel: Panel, w: int, h: int) -> Panel:
        if self.x + w > GRID_W:
            self.newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        panel["id"] = self.next_id
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        return panel

    def newline(self) -> None:
        if self.x:
            self.y += self.row_h
        self.x = 0
        self.row_h = 0

    def row(self, title: str) -> Panel:
        self.newline()
        panel: Panel = {"type": "row", "title": title, "collapsed": False, "panels": []}
        panel["gridPos"] = {"h": 1, "w": GRID_W, "x": 0, "y": self.y}
        panel["id"] = self.next_id
        self.next_id += 1
        self.y += 1
        return panel


def target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    """One Prometheus query of a panel."""
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def timeseries(
    title: str,
    targets: list[dict[str, Any]],
    unit: str = "short",
    description: str = "",
    stack: bool = False,
    bars: bool = False,
    min_: float | None = None,
    max_: float | None = None,
) -> Panel:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": _refs(targets),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    targets: list[dict[str, Any]],
    unit: str = "short",
    description: str = "",
    thresholds: list[tuple[float | None, str]] | None = None,
) -> Panel:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": _refs(targets),
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def table(
    title: str, targets: list[dict[str, Any]], description: str = "", unit: str = "short"
) -> Panel:
    for t in targets:
        t["format"] = "table"
        t["instant"] = True
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": _refs(targets),
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"showHeader": True},
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}],
    }


def heatmap(title: str, expr: str, description: str = "") -> Panel:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, "{{le}}", format="heatmap")],
        "options": {
            "calculate": False,
            "yAxis": {"unit": "short"},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Viridis", "steps": 64},
            "tooltip": {"show": True, "yHistogram": True},
        },
        "fieldConfig": {"defaults": {}, "overrides": []},
    }


def _refs(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return targets


def query_var(name: str, label: str, query: str, multi: bool = True) -> dict[str, Any]:
    """A dashboard variable filled from label values (All selected by default)."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": multi,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def datasource_var() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {"selected": True, "text": "Prometheus", "value": "prometheus"},
        "hide": 0,
    }


def dashboard(
    uid: str, title: str, description: str, panels: list[Panel], variables: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["clinisynth"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [datasource_var(), *variables]},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["clinisynth"],
                "asDropdown": True,
                "title": "clinisynth",
            }
        ],
        "panels": panels,
    }


def q(p: float, metric: str, by: str, sel: str = "") -> str:
    """histogram_quantile over a classic histogram, grouped by `by` (plus le)."""
    return (
        f"histogram_quantile({p}, sum by ({by}, le) (rate({metric}_bucket{sel}[$__rate_interval])))"
    )


# --- overview ---------------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    g = Grid()
    svc = '{service=~"$service"}'
    mdl = '{model=~"$model"}'
    p: list[Panel] = []
    p.append(g.row("Services"))
    p.append(
        g.place(
            stat(
                "Targets up",
                [target('sum by (component) (up{job=~"clinisynth|triton"})', "{{component}}")],
                description="1 = Prometheus scraped the process in the last interval.",
                thresholds=[(None, "red"), (1, "green")],
            ),
            12,
            4,
        )
    )
    p.append(
        g.place(
            stat(
                "Dependencies reachable",
                [
                    target(
                        "min by (service, dependency) (clinisynth_dependency_up)",
                        "{{service}} → {{dependency}}",
                    )
                ],
                description="Each service's last check of Triton and the artifact store (1 = reachable).",
                thresholds=[(None, "red"), (1, "green")],
            ),
            12,
            4,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Requests / s by service",
                [
                    target(
                        f"sum by (service) (rate(clinisynth_grpc_requests_total{svc}[$__rate_interval]))",
                        "{{service}}",
                    )
                ],
                unit="reqps",
            ),
            8,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Server-error ratio by service",
                [
                    target(
                        'service:clinisynth_grpc_errors:ratio_rate5m{service=~"$service"}',
                        "{{service}}",
                    )
                ],
                unit="percentunit",
                description="Share of RPCs ending INTERNAL, UNKNOWN, UNAVAILABLE, DATA_LOSS, DEADLINE_EXCEEDED "
                "or UNIMPLEMENTED (5-minute window). Alert ClinisynthHighErrorRate fires above 5%.",
                min_=0,
            ),
            8,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Responses / s by code",
                [
                    target(
                        f"sum by (code) (rate(clinisynth_grpc_requests_total{svc}[$__rate_interval]))",
                        "{{code}}",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
            8,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Latency p50 / p95 / p99 by service",
                [
                    target(
                        q(0.5, "clinisynth_grpc_request_duration_seconds", "service", svc),
                        "p50 {{service}}",
                    ),
                    target(
                        q(0.95, "clinisynth_grpc_request_duration_seconds", "service", svc),
                        "p95 {{service}}",
                    ),
                    target(
                        q(0.99, "clinisynth_grpc_request_duration_seconds", "service", svc),
                        "p99 {{service}}",
                    ),
                ],
                unit="s",
                description="Observed when a call or stream ends, so long streams count their whole life.",
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "In-flight RPCs by method",
                [
                    target(
                        f"sum by (service, method) (clinisynth_grpc_in_flight_requests{svc})",
                        "{{service}}.{{method}}",
                    )
                ],
                stack=True,
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Audit records by outcome (and records not written)",
                [
                    target(
                        f"sum by (service, outcome) (rate(clinisynth_audit_records_total{svc}[$__rate_interval]))",
                        "{{service}} {{outcome}}",
                    ),
                    target(
                        f"sum by (service) (rate(clinisynth_audit_failures_total{svc}[$__rate_interval]))",
                        "{{service}} NOT WRITTEN",
                        ref="B",
                    ),
                ],
                unit="reqps",
                description="One audit record per call (health probes excluded). A record that cannot be written turns a successful call into UNAVAILABLE: any NOT WRITTEN series means callers are being refused.",
                stack=True,
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Quota refusals by limit",
                [
                    target(
                        f"sum by (service, limit) (rate(clinisynth_quota_refusals_total{svc}[$__rate_interval]))",
                        "{{service}} {{limit}}",
                    )
                ],
                unit="reqps",
                description="Calls answered RESOURCE_EXHAUSTED because a tenant exceeded a quota (docs/OPERATIONS.md, Quotas). The audit trail says which tenant; a steady rate means a tenant needs a larger quota or is flooding.",
                stack=True,
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "TLS certificate: days until the served one expires",
                [
                    target(
                        f"min by (service) (clinisynth_tls_certificate_expiry_timestamp_seconds{svc} - time()) / 86400",
                        "{{service}}",
                    )
                ],
                unit="d",
                description="Days left on the certificate each service's gRPC port serves (absent without TLS). cert-manager renews 30 days before expiry and the services reload the renewed files, so this should never fall below ~30: a falling line means renewal or reload is stuck (alert ClinisynthTlsCertificateExpiring).",
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "TLS certificate reloads by outcome",
                [
                    target(
                        f"sum by (service, outcome) (increase(clinisynth_tls_reloads_total{svc}[$__rate_interval]))",
                        "{{service}} {{outcome}}",
                    )
                ],
                description="Changes of the certificate files seen by the services: reloaded (new connections get the new certificate) or failed (the files were half-written, corrupt or a mismatched pair; the old certificate kept serving, the service log says why).",
                bars=True,
            ),
            12,
            8,
        )
    )

    p.append(
        g.place(
            timeseries(
                "PACS outbox: deliveries by outcome, instances waiting",
                [
                    target(
                        f"sum by (service, destination, outcome) (rate(clinisynth_pacs_deliveries_total{svc}[$__rate_interval]))",
                        "{{service}} → {{destination}} {{outcome}}",
                    ),
                    target(
                        f"sum by (service, destination) (clinisynth_pacs_outbox_pending{svc})",
                        "{{service}} → {{destination}} waiting",
                        ref="B",
                    ),
                ],
                unit="short",
                description="Synthetic DICOM sent to PACS destinations (docs/OPERATIONS.md, Sending images to a PACS). Retried attempts back off; failed means the outbox gave up after its last attempt (`clinisynth pacs outbox --status failed`). A waiting count that only grows means the destination is down.",
            ),
            12,
            8,
        )
    )

    p.append(g.row("Generator"))
    p.append(
        g.place(
            timeseries(
                "Images / s by model version",
                [
                    target(
                        f"sum by (model, version) (rate(clinisynth_generator_images_total{mdl}[$__rate_interval]))",
                        "{{model}} v{{version}}",
                    )
                ],
                unit="short",
            ),
            6,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Queue depth",
                [target("sum by (instance) (clinisynth_generator_queue_depth)", "{{instance}}")],
                description="Requests accepted but not yet sampling. The HPA scales the generator on it.",
            ),
            6,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Request duration p50 / p95 by model",
                [
                    target(
                        q(0.5, "clinisynth_generator_request_duration_seconds", "model", mdl),
                        "p50 {{model}}",
                    ),
                    target(
                        q(0.95, "clinisynth_generator_request_duration_seconds", "model", mdl),
                        "p95 {{model}}",
                    ),
                ],
                unit="s",
            ),
            6,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Sampling step p95 by model",
                [
                    target(
                        q(0.95, "clinisynth_generator_step_duration_seconds", "model", mdl),
                        "{{model}}",
                    )
                ],
                unit="s",
                description="One denoiser round trip through Triton.",
            ),
            6,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Images per request (p50 / p95)",
                [
                    target(
                        q(0.5, "clinisynth_generator_batch_size", "model", mdl), "p50 {{model}}"
                    ),
                    target(
                        q(0.95, "clinisynth_generator_batch_size", "model", mdl), "p95 {{model}}"
                    ),
                ],
            ),
            8,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Memorization gate: images / s by decision",
                [
                    target(
                        f"sum by (model, decision) (rate(clinisynth_generator_memorization_total{mdl}[$__rate_interval]))",
                        "{{model}} {{decision}}",
                    )
                ],
                unit="short",
                description="Each generated image against its model's training-image index: passed, "
                "regenerated (a near-copy resampled), flagged (kept under policy flag), refused, "
                "no_index (the model has none). Refusals or regenerations rising after a model "
                "change mean it reproduces training images.",
            ),
            24,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Counterfactuals: p95 duration and flips / s",
                [
                    target(
                        q(0.95, "clinisynth_counterfactual_duration_seconds", "instance"),
                        "p95 duration {{instance}}",
                    ),
                    target(
                        "sum by (target) (rate(clinisynth_counterfactual_flips_total[$__rate_interval]))",
                        "flips/s → {{target}}",
                    ),
                ],
                description="Edits that reached the requested classifier decision, per target.",
            ),
            8,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Counterfactual edit distance (p50 / p90)",
                [
                    target(
                        q(0.5, "clinisynth_counterfactual_distance", "instance"), "p50 {{instance}}"
                    ),
                    target(
                        q(0.9, "clinisynth_counterfactual_distance", "instance"), "p90 {{instance}}"
                    ),
                ],
                description="Distance between input and counterfactual: smaller = more minimal edit. "
                "A jump after a model change means edits alter more than the finding.",
            ),
            8,
            8,
        )
    )

    p.append(g.row("Triton Inference Server"))
    p.append(
        g.place(
            timeseries(
                "Queue time per request by model",
                [
                    target(
                        'model:nv_inference_queue_duration_seconds:mean5m{model=~"$triton_model"}',
                        "{{model}}",
                    )
                ],
                unit="s",
                description="Mean wait in Triton's scheduler. Alert ClinisynthTritonQueueTimeHigh above 100 ms.",
            ),
            8,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Compute time per request by model",
                [
                    target(
                        'model:nv_inference_compute_infer_duration_seconds:mean5m{model=~"$triton_model"}',
                        "{{model}}",
                    )
                ],
                unit="s",
            ),
            8,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Dynamic batch size achieved",
                [
                    target(
                        'model:nv_inference_batch_size:mean5m{model=~"$triton_model"}', "{{model}}"
                    )
                ],
                description="Inferences per model execution: how well Triton's dynamic batcher merges "
                "requests (from different generation requests and steps).",
            ),
            8,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Inference requests / s by model",
                [
                    target(
                        'sum by (model) (rate(nv_inference_request_success{model=~"$triton_model"}[$__rate_interval]))',
                        "ok {{model}}",
                    ),
                    target(
                        'sum by (model) (rate(nv_inference_request_failure{model=~"$triton_model"}[$__rate_interval]))',
                        "failed {{model}}",
                    ),
                ],
                unit="reqps",
            ),
            24,
            8,
        )
    )

    p.append(g.row("Versions"))
    p.append(
        g.place(
            table(
                "Running versions",
                [target("max by (service, version, instance) (clinisynth_build_info)")],
            ),
            24,
            6,
        )
    )
    return dashboard(
        "clinisynth-overview",
        "clinisynth / Overview",
        "Requests, errors and latency of the four services; generator and Triton throughput.",
        p,
        [
            query_var(
                "service", "Service", "label_values(clinisynth_grpc_requests_total, service)"
            ),
            query_var(
                "model", "Generator model", "label_values(clinisynth_generator_images_total, model)"
            ),
            query_var(
                "triton_model", "Triton model", "label_values(nv_inference_request_success, model)"
            ),
        ],
    )


# --- quality ----------------------------------------------------------------------------------


def quality() -> dict[str, Any]:
    g = Grid()
    sel = '{generator_model=~"$generator_model", condition=~"$condition"}'
    csel = '{condition=~"$condition"}'
    p: list[Panel] = []
    p.append(g.row("Reward scores"))
    p.append(
        g.place(
            timeseries(
                "Mean reward score by generator version and condition",
                [
                    target(
                        f"sum by (generator_model, generator_version, condition) (rate(clinisynth_reward_score_sum{sel}[$__rate_interval]))"
                        f" / sum by (generator_model, generator_version, condition) (rate(clinisynth_reward_score_count{sel}[$__rate_interval]))",
                        "{{generator_model}} v{{generator_version}} · {{condition}}",
                    )
                ],
                unit="percentunit",
                min_=0,
                max_=1,
                description="Clinical-plausibility score (0–1) the reward model gives generated images.",
            ),
            12,
            9,
        )
    )
    p.append(
        g.place(
            heatmap(
                "Reward score distribution",
                f"sum by (le) (increase(clinisynth_reward_score_bucket{sel}[$__rate_interval]))",
                description="Histogram of scores over time for the selected generator models and conditions.",
            ),
            12,
            9,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Score p10 / p50 / p90 by generator version",
                [
                    target(
                        q(
                            0.1,
                            "clinisynth_reward_score",
                            "generator_model, generator_version",
                            sel,
                        ),
                        "p10 {{generator_model}} v{{generator_version}}",
                    ),
                    target(
                        q(
                            0.5,
                            "clinisynth_reward_score",
                            "generator_model, generator_version",
                            sel,
                        ),
                        "p50 {{generator_model}} v{{generator_version}}",
                    ),
                    target(
                        q(
                            0.9,
                            "clinisynth_reward_score",
                            "generator_model, generator_version",
                            sel,
                        ),
                        "p90 {{generator_model}} v{{generator_version}}",
                    ),
                ],
                unit="percentunit",
                min_=0,
                max_=1,
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Drift: last hour's mean minus 7-day mean",
                [
                    target(
                        f"generator_condition:clinisynth_reward_score:mean1h{sel} - generator_condition:clinisynth_reward_score:mean7d{sel}",
                        "{{generator_model}} v{{generator_version}} · {{condition}}",
                    )
                ],
                description="Alert ClinisynthRewardScoreDrift fires when |drift| > 0.15 for an hour.",
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Images scored / s by reward model version",
                [
                    target(
                        "sum by (model, version) (rate(clinisynth_reward_images_scored_total[$__rate_interval]))",
                        "{{model}} v{{version}}",
                    )
                ],
            ),
            24,
            6,
        )
    )

    p.append(g.row("Expert feedback"))
    p.append(
        g.place(
            timeseries(
                "Plausibility rate (experts) by condition",
                [
                    target(
                        f"condition:clinisynth_reward_feedback_plausible:ratio_rate1h{csel}",
                        "{{condition}}",
                    )
                ],
                unit="percentunit",
                min_=0,
                max_=1,
                description="Share of expert ratings that judged the image plausible, over the last hour.",
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Feedback volume per hour",
                [
                    target(
                        f"sum by (condition, label) (increase(clinisynth_reward_feedback_total{csel}[1h]))",
                        "{{condition}} · {{label}}",
                    )
                ],
                bars=True,
                stack=True,
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Review queue backlog",
                [
                    target(
                        f"sum by (condition) (clinisynth_reward_feedback_pending{csel})",
                        "{{condition}}",
                    )
                ],
                description="Images waiting for an expert. Alert ClinisynthFeedbackBacklog above 500 for an hour.",
                stack=True,
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Rater agreement (kappa) by condition",
                [
                    target(
                        f"max by (condition) (clinisynth_reward_rater_agreement_kappa{csel})",
                        "{{condition}}",
                    )
                ],
                description="Below 0.4 the labels are too noisy to train on (alert ClinisynthRaterAgreementLow).",
                min_=-1,
                max_=1,
            ),
            12,
            8,
        )
    )
    return dashboard(
        "clinisynth-quality",
        "clinisynth / Quality",
        "Reward-score distributions by generator version and condition, expert plausibility "
        "rate, feedback volume and rater agreement.",
        p,
        [
            query_var(
                "generator_model",
                "Generator model",
                "label_values(clinisynth_reward_score_count, generator_model)",
            ),
            query_var(
                "condition", "Condition", "label_values(clinisynth_reward_score_count, condition)"
            ),
        ],
    )


# --- jobs -------------------------------------------------------------------------------------


def jobs() -> dict[str, Any]:
    g = Grid()
    ksel = '{kind=~"$kind"}'
    p: list[Panel] = []
    p.append(g.row("Queue"))
    p.append(
        g.place(
            stat(
                "Running jobs",
                [target('sum(clinisynth_finetune_jobs{state="running", kind=~"$kind"})')],
            ),
            6,
            4,
        )
    )
    p.append(
        g.place(
            stat(
                "Queued jobs",
                [target('sum(clinisynth_finetune_jobs{state="queued", kind=~"$kind"})')],
                thresholds=[(None, "green"), (5, "orange")],
            ),
            6,
            4,
        )
    )
    p.append(
        g.place(
            stat(
                "Failures (24 h)",
                [target(f"sum(increase(clinisynth_finetune_job_failures_total{ksel}[24h]))")],
                thresholds=[(None, "green"), (1, "red")],
            ),
            6,
            4,
        )
    )
    p.append(
        g.place(
            stat(
                "Oldest checkpoint age",
                [
                    target(
                        f"max(time() - clinisynth_finetune_checkpoint_last_timestamp_seconds{ksel})"
                    )
                ],
                unit="s",
                thresholds=[(None, "green"), (3600, "orange"), (7200, "red")],
                description="Alert ClinisynthFinetuneCheckpointStale fires past 2 hours.",
            ),
            6,
            4,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Jobs by state",
                [
                    target(
                        f"sum by (state, kind) (clinisynth_finetune_jobs{ksel})",
                        "{{kind}} · {{state}}",
                    )
                ],
                stack=True,
            ),
            12,
            8,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Job failures per hour by kind",
                [
                    target(
                        f"sum by (kind) (increase(clinisynth_finetune_job_failures_total{ksel}[1h]))",
                        "{{kind}}",
                    )
                ],
                bars=True,
            ),
            12,
            8,
        )
    )

    p.append(g.row("Training"))
    p.append(
        g.place(
            timeseries(
                "Loss curves",
                [
                    target(
                        'clinisynth_finetune_job_loss{kind=~"$kind", job=~"$job"}',
                        "{{job}} ({{kind}})",
                    )
                ],
                description="Last reported training loss of each running job.",
            ),
            12,
            9,
        )
    )
    p.append(
        g.place(
            timeseries(
                "Optimizer steps / s",
                [
                    target(
                        'deriv(clinisynth_finetune_job_step{kind=~"$kind", job=~"$job"}[5m])',
                        "{{job}}",
                    )
                ],
            ),
            12,
            9,
        )
    )
    p.append(
        g.place(
            table(
                "Running jobs: step, loss, checkpoint age",
                [
                    target(
                        'max by (job, kind) (clinisynth_finetune_job_step{kind=~"$kind", job=~"$job"})'
                    ),
                    target(
                        'max by (job, kind) (clinisynth_finetune_job_loss{kind=~"$kind", job=~"$job"})'
                    ),
                    target(
                        'max by (job, kind) (time() - clinisynth_finetune_checkpoint_last_timestamp_seconds{kind=~"$kind", job=~"$job"})'
                    ),
                ],
            ),
            24,
            8,
        )
    )
    p[-1]["transformations"] = [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True},
                "renameByName": {
                    "Value #A": "step",
                    "Value #B": "loss",
                    "Value #C": "checkpoint age (s)",
                },
            },
        },
    ]
    return dashboard(
        "clinisynth-jobs",
        "clinisynth / Jobs",
        "Fine-tuning jobs: running and queued, loss curves, checkpoint age, failures.",
        p,
        [
            query_var("kind", "Kind", "label_values(clinisynth_finetune_jobs, kind)"),
            query_var(
                "job", "Job", 'label_values(clinisynth_finetune_job_loss{kind=~"$kind"}, job)'
            ),
        ],
    )


BUILDERS = {"overview.json": overview, "quality.json": quality, "jobs.json": jobs}


def render() -> dict[str, str]:
    """File name -> JSON text, deterministic (sorted keys, trailing newline)."""
    return {
        name: json.dumps(build(), indent=2, sort_keys=True) + "\n"
        for name, build in BUILDERS.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    args = parser.parse_args()
    stale = []
    for name, text in render().items():
        path = OUT_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale dashboards (re-run build_dashboards.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
