"""``clinisynth finetune ...`` (durable training jobs) and ``clinisynth data ...`` (data sets)."""

from __future__ import annotations

import argparse
import sys

from clinisynth import DatasetReport, FinetuneJob
from clinisynth.cli._common import client_from, parse_sets, print_json


def _line(job: FinetuneJob) -> str:
    loss = job.metrics.get("loss")
    extra = f" loss={loss:.4f}" if loss is not None else ""
    queue = f" queue#{job.queue_position}" if job.queue_position else ""
    reason = f"  ({job.failure_reason})" if job.failure_reason else ""
    return (
        f"{job.id}  {job.kind:24s} {job.state:9s} {job.step}/{job.max_steps}{extra}{queue}"
        f"  {job.dataset} → {job.model_name}{reason}"
    )


def cmd_create(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        job = client.finetune.create(
            ns.kind,
            ns.data,
            params=parse_sets(ns.set),
            model_name=ns.model_name,
            request_id=ns.request_id,
        )
    print(job.id)
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        jobs = client.finetune.list(state=ns.state, kind=ns.kind)
    if ns.json:
        print_json([j.to_dict() for j in jobs])
    else:
        for job in jobs:
            print(_line(job))
    return 0


def cmd_get(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        job = client.finetune.get(ns.id)
    if ns.json:
        print_json(job.to_dict())
    else:
        print(_line(job))
        for k, v in sorted(job.params.items()):
            print(f"  {k} = {v}")
    return 0


def cmd_watch(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        if ns.json:
            for event in client.finetune.watch(ns.id, since=ns.since):
                print_json(
                    {
                        "sequence": event.sequence,
                        "type": event.type,
                        "state": event.state,
                        "step": event.step,
                        "metrics": event.metrics,
                        "message": event.message,
                    }
                )
            job = client.finetune.get(ns.id)
        else:
            job = client.finetune.wait(ns.id, progress=True)
    print(_line(job), file=sys.stderr if ns.json else sys.stdout)
    return 0 if job.state == "succeeded" else 1


def cmd_cancel(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        print(_line(client.finetune.cancel(ns.id, strict=ns.strict)))
    return 0


def cmd_checkpoints(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        checkpoints = client.finetune.checkpoints(ns.id)
    if ns.json:
        print_json([c.to_dict() for c in checkpoints])
    else:
        for c in checkpoints:
            metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(c.metrics.items()))
            print(f"{c.id}{' *best*' if c.best else ''}  step={c.step}  {metrics}  {c.uri}")
    return 0


def cmd_promote(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        result = client.finetune.promote(ns.id, ns.checkpoint, model_name=ns.model_name)
    prev = f" (previous version {result.previous_version} kept)" if result.previous_version else ""
    print(f"{result.model.name}@{result.model.version} {result.model.kind}{prev}")
    return 0


def cmd_kinds(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        kinds = client.finetune.kinds()
    if ns.json:
        print_json([k.to_dict() for k in kinds])
        return 0
    for k in kinds:
        print(f"{k.name}  [{k.dataset_layout}]  {k.description}")
        for p in k.params:
            choices = f" ({'|'.join(p.choices)})" if p.choices else ""
            print(f"    {p.name}: {p.type}{choices} = {p.default!r}  {p.description}")
    return 0


def cmd_upload(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        try:
            report = client.finetune.upload_dataset(
                ns.dir,
                ns.prefix,
                layout=ns.layout,
                shards=not ns.files,
                shard_mb=ns.shard_mb,
                reports_csv=ns.reports,
                report_key=ns.report_key,
                report_text=ns.report_text,
                section=ns.section,
                class_column=ns.class_column,
                progress=not ns.quiet,
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return _print_report(report, ns.json)


def cmd_validate(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        report = client.finetune.validate_dataset(ns.prefix, layout=ns.layout)
    return _print_report(report, ns.json)


def _print_report(report: DatasetReport, as_json: bool) -> int:
    if as_json:
        print_json(report.to_dict())
    else:
        per = ", ".join(f"{c}={n}" for c, n in sorted(report.per_class.items()))
        print(
            f"{report.prefix} [{report.layout}]: {report.images} images"
            + (f"; {per}" if per else "")
        )
        for problem in report.problems:
            print(f"  problem: {problem}")
    return 0 if report.ok else 2


LAYOUTS = ["image_folder", "image_text_manifest", "feedback_export"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="durable training jobs").add_subparsers(
        dest="finetune_command", metavar="SUBCOMMAND", required=True
    )

    p = ft.add_parser("create", help="validate and queue a job; prints its id")
    p.add_argument("--kind", "-k", required=True, help="see `clinisynth finetune kinds`")
    p.add_argument("--data", "-d", required=True, help="data set store prefix")
    p.add_argument(
        "--param",
        "--set",
        "-s",
        dest="set",
        action="append",
        metavar="KEY=VALUE",
        help="a job parameter (repeat it), e.g. --param nproc_per_node=2",
    )
    p.add_argument("--model-name", help="model a promote writes to")
    p.add_argument("--request-id", help="idempotency key (default: random)")
    p.set_defaults(func=cmd_create)

    p = ft.add_parser("list", help="jobs, newest first")
    p.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--kind")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = ft.add_parser("get", help="one job")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_get)

    p = ft.add_parser("watch", help="progress bar and events until the job ends")
    p.add_argument("id")
    p.add_argument("--since", type=int, default=0, help="replay events after this sequence")
    p.add_argument("--json", action="store_true", help="events as JSON, no bar")
    p.set_defaults(func=cmd_watch)

    p = ft.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("id")
    p.add_argument("--strict", action="store_true", help="fail if the job already ended")
    p.set_defaults(func=cmd_cancel)

    p = ft.add_parser("checkpoints", help="a job's checkpoints")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_checkpoints)

    p = ft.add_parser("promote", help="serve a checkpoint as a new model version")
    p.add_argument("id")
    p.add_argument("checkpoint", nargs="?", help="checkpoint id (default: best, else last)")
    p.add_argument("--model-name", help="default: the job's model name")
    p.set_defaults(func=cmd_promote)

    p = ft.add_parser("kinds", help="job kinds with their parameters and defaults")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kinds)

    data = sub.add_parser("data", help="training data sets in the store").add_subparsers(
        dest="data_command", metavar="SUBCOMMAND", required=True
    )
    p = data.add_parser(
        "upload",
        help="validate a local folder, upload it to PREFIX as tar shards + index.json "
        "(resumable: a re-run skips the shards already stored)",
    )
    p.add_argument("dir")
    p.add_argument("prefix", help="store prefix under datasets/, e.g. datasets/cells")
    p.add_argument(
        "--layout",
        choices=[*LAYOUTS, "dicom_archive"],
        help="default: guessed from the folder; dicom_archive = a DICOM tree + --reports CSV",
    )
    p.add_argument("--files", action="store_true", help="one store object per file, no shards")
    p.add_argument("--shard-mb", type=float, default=64.0, help="about this many MB a shard")
    p.add_argument("--reports", help="dicom_archive: CSV of report text, one row per study/image")
    p.add_argument("--report-key", default="study_id", help="CSV column matched to a folder/stem")
    p.add_argument("--report-text", default="report", help="CSV column holding the report")
    p.add_argument("--section", default="impression", help="report section used as the prompt")
    p.add_argument("--class-column", help="CSV column whose value is the image's class folder")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_upload)
    p = data.add_parser("validate", help="check a data set already in the store")
    p.add_argument("prefix")
    p.add_argument("--layout", choices=LAYOUTS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)
