"""``clinisynth models [list | show | import | delete | alias]``: bring and manage your own models.

``clinisynth models`` alone lists what the stack serves (as it always did).
"""

from __future__ import annotations

import argparse

from clinisynth._models import ModelDetails
from clinisynth.cli._common import client_from, print_json
from clinisynth.cli.generator import cmd_models

KINDS = ["text_to_image", "class_conditional", "unconditional", "reward", "classifier"]


def _labels(pairs: list[str] | None, flag: str = "--label") -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _print_details(d: ModelDetails) -> None:
    m = d.model
    state = "retired" if d.retired else ("latest" if m.latest else "served")
    print(f"{d.ref}  {m.kind}  {m.width}x{m.height}x{m.channels}  {state}")
    if m.description:
        print(f"  description: {m.description}")
    print(f"  aliases:     {', '.join(d.aliases) or '-'}")
    print(f"  dtype:       {d.dtype}    device: {d.device}    instances: {d.instances}")
    print(f"  max batch:   {d.max_batch_size or '-'}    layout: {d.layout}")
    print(f"  size:        {d.size_bytes / 1e6:.1f} MB    digest: {m.digest}")
    print(
        f"  defaults:    sampler={m.default_sampler} steps={m.default_steps} "
        f"scheduler={d.scheduler or '-'}"
    )
    if d.source:
        print(f"  source:      {d.source}")
    if d.base:
        print(f"  base:        {d.base} (+ LoRA)")
    for label, value in sorted(m.labels.items()):
        print(f"  label:       {label}={value}")
    for c in d.components:
        ready = "ready" if c.ready else "not loaded"
        how = f"  {c.dtype} on {c.device}" if c.dtype else ""
        print(f"  component:   {c.role:14s} {c.triton_model} v{c.triton_version}  {ready}{how}")


def _emit(ns: argparse.Namespace, details: ModelDetails) -> int:
    if getattr(ns, "json", False):
        print_json(details.to_dict())
    else:
        _print_details(details)
    return 0


def cmd_show(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        return _emit(ns, client.get_model(ns.model))


def cmd_import(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        details = client.import_model(
            ns.path,
            name=ns.name,
            description=ns.description,
            labels=_labels(ns.label),
            dtype=ns.dtype,
            device=ns.device,
            instances=ns.instances,
            max_batch_size=ns.max_batch,
            base=ns.base,
            component_dtypes=_labels(ns.component_dtype, "--component-dtype"),
            component_devices=_labels(ns.component_device, "--component-device"),
            replay=ns.replay,
            layout=ns.layout,
            progress=not ns.quiet and not ns.json,
            timeout=ns.timeout or 1800.0,
        )
    return _emit(ns, details)


def cmd_delete(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        details = client.delete_model(ns.model)
    if getattr(ns, "json", False):
        print_json(details.to_dict())
    else:
        print(f"{details.ref} retired")
    return 0


def cmd_alias(ns: argparse.Namespace) -> int:
    with client_from(ns) as client:
        details = client.alias_model(ns.model, ns.alias)
    print(f"{details.model.name}@{ns.alias} → {details.ref}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="models the stack serves: list, show, import, delete, alias")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--all-versions", action="store_true")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_models)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")

    def json_flag(q: argparse.ArgumentParser) -> None:
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")

    q = msub.add_parser("list", help="served models (latest version of each name)")
    q.add_argument("--kind", choices=KINDS, default=argparse.SUPPRESS)
    q.add_argument("--all-versions", action="store_true", default=argparse.SUPPRESS)
    json_flag(q)
    q.set_defaults(func=cmd_models)

    q = msub.add_parser("show", help="one version in full: components, dtype, device, size")
    q.add_argument("model", metavar="NAME[@VERSION|@ALIAS]")
    json_flag(q)
    q.set_defaults(func=cmd_show)

    q = msub.add_parser("import", help="serve a checkpoint folder (local or a store prefix)")
    q.add_argument("path", metavar="PATH", help="a local folder, or a store prefix")
    q.add_argument("--name", required=True, help="catalog name; the import is its next version")
    q.add_argument("--description")
    q.add_argument("--label", action="append", metavar="KEY=VALUE")
    q.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    q.add_argument("--device", choices=["cpu", "gpu"])
    q.add_argument(
        "--component-dtype",
        action="append",
        metavar="COMPONENT=DTYPE",
        help="one component's dtype (unet, text_encoder, vae), e.g. vae=float32; under "
        "--dtype float16 the VAE stays float32 unless named",
    )
    q.add_argument(
        "--component-device",
        action="append",
        metavar="COMPONENT=DEVICE",
        help="one component's device (unet, text_encoder, vae), e.g. vae=cpu",
    )
    q.add_argument(
        "--replay",
        choices=["exact", "batched"],
        help="exact (default): bit-identical pixels whatever is batched with a request; "
        "batched: requests share forward passes (more throughput on a GPU), replay up to float "
        "rounding",
    )
    q.add_argument(
        "--layout",
        choices=["split", "packed"],
        help="split (default): one Triton model (a process per instance) per component; "
        "packed: one process per instance holds every component (less memory, one device)",
    )
    q.add_argument("--instances", type=int, help="Triton instances per component")
    q.add_argument("--max-batch", type=int, help="Triton max batch size per component")
    q.add_argument(
        "--base",
        metavar="NAME@VERSION",
        help="PATH is a LoRA adapter folder: merge it into this version, serve it as --name",
    )
    q.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    json_flag(q)
    q.set_defaults(func=cmd_import)

    q = msub.add_parser("delete", help="retire NAME@VERSION (unloaded, kept for provenance)")
    q.add_argument("model", metavar="NAME@VERSION")
    json_flag(q)
    q.set_defaults(func=cmd_delete)

    q = msub.add_parser("alias", help="point NAME@ALIAS at NAME@VERSION")
    q.add_argument("model", metavar="NAME@VERSION")
    q.add_argument("alias", metavar="ALIAS")
    q.set_defaults(func=cmd_alias)
