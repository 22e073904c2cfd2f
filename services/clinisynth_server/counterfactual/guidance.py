"""The guidance Triton model: one denoiser version + one robust / plain classifier pair.

Why a model of its own: the guided step back-propagates both classifiers through the denoiser,
and autograd cannot cross an RPC, so the three networks must sit in one Triton model (role
``cf_guidance``). The catalog keeps the three as ordinary models (a denoiser registered from a
``UNet2DModel`` folder, two classifiers from classifier folders); a *combination* is derived:

- its Triton name is deterministic — ``<denoiser>.cf_guidance.<hash>`` where the hash covers the
  three catalog refs and weight digests — so every service replica finds the same model and a new
  version of any of the three gives a new combination (old ones keep serving pinned requests);
- :func:`ensure_guidance_model` writes it into the Triton model repository from the weight folders
  Triton already serves for the three records (``<repo>/<component>/<version>/weights``), loads it,
  and records what it combines in the store (``counterfactual/guidance/<name>.json``);
- the service creates combinations on first use when it is given the model repository path
  (``CLINISYNTH_COUNTERFACTUAL_MODEL_REPOSITORY``, the folder Triton serves); without it, an
  operator creates them ahead of time with ``python -m clinisynth_server.counterfactual.guidance``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from clinisynth_server.store.base import ArtifactStore
from clinisynth_server.triton import repository
from clinisynth_server.triton.backends.cf_guidance import FORMAT_VERSION, KIND
from clinisynth_server.triton.client import TritonClient

ROLE = "cf_guidance"
RECORD_PREFIX = "counterfactual/guidance/"
MAX_BATCH_SIZE = 16


def guidance_model_name(denoiser: ModelRecord, robust: ModelRecord, plain: ModelRecord) -> str:
    """The Triton model name of a combination (stable across replicas and restarts)."""
    key = "|".join(f"{r.name}@{r.version}:{r.digest}" for r in (denoiser, robust, plain))
    return f"{denoiser.name}.{ROLE}.{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _weights(repo: pathlib.Path, record: ModelRecord, role: str) -> pathlib.Path:
    if role not in record.components:
        raise InvalidArgument.for_field(
            "model", f"{record.ref} has no {role!r} component (components: {record.components})"
        )
    folder = repo / record.components[role] / str(record.component_versions[role]) / "weights"
    if not (folder / "config.json").is_file():
        raise FailedPrecondition(
            f"the Triton model repository {repo} has no weights for {record.ref} at {folder}"
        )
    return folder


def write_guidance_folder(
    folder: pathlib.Path,
    denoiser_weights: pathlib.Path,
    robust_weights: pathlib.Path,
    plain_weights: pathlib.Path,
    *,
    channels: int,
    classes: Sequence[str],
    sources: Mapping[str, str],
) -> pathlib.Path:
    """The ``cf_guidance`` weights folder (sub-folders are symlinks; the repository copies them)."""
    folder.mkdir(parents=True, exist_ok=True)
    unet_config = json.loads((denoiser_weights / "config.json").read_text())
    if unet_config.get("_class_name") != "UNet2DModel" or unet_config.get("num_class_embeds"):
        raise InvalidArgument.for_field(
            "diffusion_model.name",
            "the counterfactual denoiser must be an unconditional UNet2DModel",
        )
    in_ch = int(unet_config.get("in_channels", 3))
    out_ch = int(unet_config.get("out_channels", in_ch))
    for name, src in (
        ("denoiser", denoiser_weights),
        ("robust", robust_weights),
        ("plain", plain_weights),
    ):
        os.symlink(src.resolve(), folder / name, target_is_directory=True)
    meta = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "channels": channels,
        "classes": list(classes),
        "learned_variance": out_ch == 2 * in_ch,
        "sources": dict(sources),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    return folder


def _sources(denoiser: ModelRecord, robust: ModelRecord, plain: ModelRecord) -> dict[str, str]:
    return {
        "diffusion_model": denoiser.ref,
        "diffusion_digest": denoiser.digest,
        "robust_classifier": robust.ref,
        "robust_digest": robust.digest,
        "plain_classifier": plain.ref,
        "plain_digest": plain.digest,
    }


_LOCK = threading.Lock()


def ensure_guidance_model(
    denoiser: ModelRecord,
    robust: ModelRecord,
    plain: ModelRecord,
    *,
    model_repository: str | pathlib.Path,
    triton: TritonClient,
    store: ArtifactStore | None = None,
    instance_kind: str = "cpu",
    parameters: Mapping[str, str] | None = None,
) -> str:
    """Write (if absent) and load the combination's Triton model; return its name."""
    name = guidance_model_name(denoiser, robust, plain)
    repo = pathlib.Path(model_repository)
    with _LOCK:
        if triton.model_ready(name):
            return name
        if not (repo / name / "config.pbtxt").is_file():
            with tempfile.TemporaryDirectory(dir=repo, prefix=".cf-staging-") as tmp:
                folder = write_guidance_folder(
                    pathlib.Path(tmp) / "weights",
                    _weights(repo, denoiser, "denoiser"),
                    _weights(repo, robust, "classifier"),
                    _weights(repo, plain, "classifier"),
                    channels=denoiser.channels,
                    classes=robust.classes,
                    sources=_sources(denoiser, robust, plain),
                )
                # another replica may have written it first: same inputs, same model
                with contextlib.suppress(AlreadyExists):
                    repository.write_model(
                        repo,
                        name,
                        ROLE,
                        folder,
                        version=1,
                        max_batch_size=MAX_BATCH_SIZE,
                        instance_kind=repository.check_instance_kind(instance_kind),
                        parameters=parameters,
                    )
        triton.load_model(name)
    if store is not None:
        record = {"triton_model": name, **_sources(denoiser, robust, plain), "created": time.time()}
        store.put_if_absent(
            f"{RECORD_PREFIX}{name}.json",
            json.dumps(record, indent=2).encode(),
            content_type="application/json",
        )
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """Create a combination ahead of time (for deployments where services cannot write)."""
    from clinisynth_server.store import open_store

    p = argparse.ArgumentParser(prog="python -m clinisynth_server.counterfactual.guidance")
    p.add_argument("--store", required=True, help="artifact store URL (catalog)")
    p.add_argument("--triton", default="127.0.0.1:8001", help="Triton gRPC host:port")
    p.add_argument("--repository", required=True, help="the Triton model repository folder")
    p.add_argument("denoiser", help="NAME[@VERSION] of an unconditional denoiser")
    p.add_argument("robust", help="NAME[@VERSION] of the robust classifier")
    p.add_argument("plain", help="NAME[@VERSION] of the plain classifier")
    p.add_argument("--gpu", action="store_true", help="KIND_GPU instance")
    ns = p.parse_args(argv)
    store = open_store(ns.store)
    catalog = Catalog(store)
    records = [catalog.get(*ref.partition("@")[::2]) for ref in (ns.denoiser, ns.robust, ns.plain)]
    with TritonClient(ns.triton, timeout_s=600) as triton:
        name = ensure_guidance_model(
            *records,
            model_repository=ns.repository,
            triton=triton,
            store=store,
            instance_kind="gpu" if ns.gpu else "cpu",
        )
    print(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
