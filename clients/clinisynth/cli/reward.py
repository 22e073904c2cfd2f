"""``clinisynth score``, ``feedback {list,export,agreement}`` and ``review enqueue``."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import sys
from typing import Any

from clinisynth._images import is_pacs_url
from clinisynth.cli._common import client_from, print_json


def cmd_score(ns: argparse.Namespace) -> int:
    if is_pacs_url(ns.folder):  # one image in a PACS, fetched and de-identified by the service
        with client_from(ns) as client:
            scores = client.score(
                [ns.folder],
                model=ns.model,
                class_name=ns.class_name,
                prompt=ns.prompt,
                resize=ns.resize,
                domain_guard=ns.domain_guard,
                timeout=ns.timeout,
            )
        scores = [dataclasses.replace(s, name=ns.folder) for s in scores]
        return _write_scores(ns, scores)
    with client_from(ns) as client:
        scores = client.score_folder(
            ns.folder,
            model=ns.model,
            class_name=ns.class_name,
            prompt=ns.prompt,
            resize=ns.resize,
            batch_size=ns.batch_size,
            domain_guard=ns.domain_guard,
            progress=not ns.quiet,
            timeout=ns.timeout,
        )
    return _write_scores(ns, scores)


def _write_scores(ns: argparse.Namespace, scores: list[Any]) -> int:
    out = open(ns.out, "w", newline="") if ns.out != "-" else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(out)
        # under --domain-guard warn, each row also says whether its image was in domain
        warn = getattr(ns, "domain_guard", None) == "warn"
        header = ["path", "reward", "p_aligned", "model_version"]
        writer.writerow(header + (["domain", "domain_score"] if warn else []))
        for s in scores:
            row = [s.name, f"{s.reward:.6f}", f"{s.p_aligned:.6f}", s.model_version]
            if warn:
                score = "" if s.domain_score is None else f"{s.domain_score:.4f}"
                row += [s.domain, score]
            writer.writerow(row)
    finally:
        if out is not sys.stdout:
            out.close()
    if ns.out != "-" and not ns.quiet:
        mean = sum(s.p_aligned for s in scores) / len(scores)
        print(f"{len(scores)} images scored, mean reward {mean:.3f} → {ns.out}", file=sys.stderr)
    return 0


def _cond(ns: argparse.Namespace) -> dict[str, Any]:
    return {"class_name": ns.class_name, "prompt": ns.prompt}


def cmd_feedback_list(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        rows = client.feedback.list(rater_id=ns.rater, timeout=ns.timeout, **_cond(ns))
    if ns.json:
        print_json([dataclasses.asdict(r) for r in rows])
        return 0
    for r in rows:
        verdict = "plausible  " if r.plausible else "implausible"
        cond = r.condition.get("class_name") or r.condition.get("prompt", "")
        print(f"{r.id}  {r.rater_id:12s} {verdict} {cond}  {r.image_key}")
    return 0


def cmd_feedback_export(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        res = client.feedback.export(
            out=ns.out, prefix=ns.prefix, aggregate=ns.aggregate, timeout=ns.timeout, **_cond(ns)
        )
    print(f"{res.judgements} judgements, {res.images} images → {res.out} (store: {res.prefix})")
    return 0


def cmd_feedback_agreement(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        report = client.agreement(timeout=ns.timeout, **_cond(ns))
    if ns.json:
        print_json(dataclasses.asdict(report))
        return 0
    for c in report.conditions:
        cond = c.condition.get("class_name") or c.condition.get("prompt", "")
        print(
            f"{cond:20s} {c.statistic:6s} kappa={c.kappa:.3f} "
            f"agree={c.percent_agreement:.1%} items={c.shared_items} raters={c.raters}"
        )
    for r in report.raters:
        print(f"  {r.rater_id:12s} n={r.judgements} plausible={r.plausible_rate:.0%}")
    return 0


def review_names(folder: pathlib.Path, paths: list[pathlib.Path], label: str | None) -> list[str]:
    """Item names shown to raters: the path inside ``folder`` (nothing above it), or with
    ``--label`` ``LABEL-0001``... so that not even file names (often patient names) leave."""
    if label:
        return [f"{label}-{i:04d}" for i in range(1, len(paths) + 1)]
    return [p.relative_to(folder).as_posix() for p in paths]


def cmd_review_enqueue(ns: argparse.Namespace) -> int:
    folder = pathlib.Path(ns.folder)
    paths = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm")
    )
    with client_from(ns) as client:
        items = client.review.enqueue(
            paths,
            names=review_names(folder, paths, ns.label),
            raters_per_item=ns.raters_per_item,
            timeout=ns.timeout,
            **_cond(ns),
        )
    print(f"{len(items)} review items")
    return 0


def _add_condition(p: argparse.ArgumentParser) -> None:
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--class", dest="class_name", help="class name (cell type, finding)")
    cond.add_argument("--prompt", "-p", help="prompt (text-conditioned reward models)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score every image in a folder with a reward model")
    p.add_argument(
        "folder",
        help="folder of PNG / JPEG / DICOM / .npy images "
        "(sub-folders name the class unless --class / --prompt is given)",
    )
    p.add_argument(
        "--model",
        "-m",
        help="reward model NAME or NAME@VERSION (default: the service's default for the condition)",
    )
    _add_condition(p)
    p.add_argument(
        "--out",
        "-o",
        default="-",
        help="CSV file (path,reward,p_aligned,model_version[,domain,domain_score]); '-' = stdout",
    )
    p.add_argument("--resize", action="store_true", help="resize to the model's input size")
    p.add_argument(
        "--domain-guard",
        choices=["refuse", "warn"],
        help="an image far outside the reward model's training images: refuse the request "
        "(default) or warn (score it; the CSV gains domain and domain_score columns)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)

    fb = sub.add_parser("feedback", help="expert judgements: list, export, agreement")
    fsub = fb.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)
    p = fsub.add_parser("list", help="stored judgements")
    _add_condition(p)
    p.add_argument("--rater")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_feedback_list)
    p = fsub.add_parser("export", help="write the labelled data set and download it")
    p.add_argument("--out", "-o", required=True, help="local folder (labels.jsonl + images/)")
    p.add_argument("--prefix", help="store prefix for the export (default exports/feedback/<t>)")
    p.add_argument("--aggregate", choices=["all", "majority"], default="all")
    _add_condition(p)
    p.set_defaults(func=cmd_feedback_export)
    p = fsub.add_parser("agreement", help="inter-rater agreement and rater statistics")
    _add_condition(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_feedback_agreement)

    rv = sub.add_parser("review", help="the expert review queue")
    rsub = rv.add_subparsers(dest="review_command", metavar="ACTION", required=True)
    p = rsub.add_parser("enqueue", help="put every image of a folder in the review queue")
    p.add_argument("folder")
    _add_condition(p)
    p.add_argument("--raters-per-item", type=int, default=1)
    p.add_argument(
        "--label",
        help="name items LABEL-0001, LABEL-0002, ... instead of by their path in the folder",
    )
    p.set_defaults(func=cmd_review_enqueue)
