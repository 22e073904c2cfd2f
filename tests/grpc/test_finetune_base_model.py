"""A finetune job's ``params.base_model`` store prefix stays in what a caller may build on
(issue #14), through the running finetune service (SDK → gRPC → service → real store).

A loadable pixel UNet folder is planted under every protected namespace (the de-identification
secret's folder, catalog records, feedback, review items, a job's resume state, a checkpoint
that never finished, model repositories). Naming any of them, or reaching one by an escape, is
INVALID_ARGUMENT on ``params[base_model]`` and creates no job; a present and an absent protected
prefix get the same answer. The same folder in a caller's namespaces (``datasets/``,
``imports/``) and in a finished checkpoint's ``model/`` folder is accepted (shown by a request
whose only violation is on another field, so no training starts; test_finetune.py trains from
real checkpoints).
"""

from __future__ import annotations

import pytest

import clinisynth

pytestmark = pytest.mark.stack

CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
FIELD = "params[base_model]"
JOB = "finetune/jobs/ft-planted-000001"
PROTECTED = [
    "finetune/secrets/planted",
    "catalog/planted",
    "feedback/records/planted",
    "feedback/images/planted",
    "review/items/planted",
    f"{JOB}/checkpoints/000000010/state",  # a job's resume state, not its model folder
    f"{JOB}/checkpoints/000000020/model",  # a checkpoint without checkpoint.json: unfinished
    f"{JOB}/artifacts",
    "counterfactual/guidance/planted",
    "triton-models/planted",
    "model-repository/planted",
    "jobs/planted",
    "checkpoints/planted",
]
ESCAPES = [
    "datasets/../finetune/secrets/planted",
    f"{JOB}/checkpoints/000000010/model/../state",
    "/finetune/secrets/planted",
    "finetune\\secrets\\planted",
    "./catalog/planted",
    "datasets//../catalog/planted",
]
ALLOWED = [
    "datasets/bm/px",
    "imports/bm/px",
    f"{JOB}/checkpoints/000000010/model",
    f"{JOB}/checkpoints/000000010/model/",
]


@pytest.fixture(scope="module")
def planted(store, tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    """The cells data set; one pixel UNet folder under every prefix above."""
    from clinisynth_lab import builders
    from clinisynth_lab.phantoms import cells, datasets

    home = tmp_path_factory.mktemp("base-model")
    imgs, labels = cells.generate(16, seed=5, size=24)
    datasets.write_image_folder_to_store(store, "bm/cells", imgs, labels, CLASSES)
    folder = builders.build_pixel_unet(home / "px", classes=CLASSES, size=24)
    for prefix in [*PROTECTED, *ALLOWED[:3]]:
        store.upload_dir(folder, prefix)
    store.put_json(f"{JOB}/checkpoints/000000010/checkpoint.json", {"step": 10})
    return "bm/cells"


@pytest.fixture(scope="module")
def client(triton_server, store_url, tmp_path_factory, model_repository):  # type: ignore[no-untyped-def]
    from conftest import start_service

    home = tmp_path_factory.mktemp("base-model-service")
    running = start_service(
        "finetune",
        triton_server.grpc_url,
        store_url,
        home,
        workdir=str(home / "work"),
        model_repository=str(model_repository),
        torch_threads="1",
    )
    with clinisynth.Client(endpoints={"finetune": running.address}, timeout=60) as c:
        yield c
        for job in c.finetune.list():  # leave no worker behind (a regression would start one)
            if not job.done:
                c.finetune.cancel(job.id)
    running.stop(0)


def _create(client, dataset: str, base_model: str, **extra: object):  # type: ignore[no-untyped-def]
    params = {
        "batch_size": 8,
        "max_steps": 5,
        "block_out_channels": "16,32",
        "base_model": base_model,
        **extra,
    }
    return client.finetune.create("diffusion_pretrain", dataset, params=params)


@pytest.mark.parametrize("prefix", PROTECTED + ESCAPES)
def test_protected_prefixes_are_refused_as_base_model(client, planted, store, prefix):  # type: ignore[no-untyped-def]
    before = {j.id for j in client.finetune.list()}
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        _create(client, planted, prefix)
    assert info.value.fields == [FIELD], (prefix, info.value.fields, str(info.value))
    assert {j.id for j in client.finetune.list()} == before  # no job was queued
    absent = prefix.replace("planted", "absent")
    if absent != prefix:  # no existence oracle: an absent protected prefix reads the same
        with pytest.raises(clinisynth.InvalidArgumentError) as info2:
            _create(client, planted, absent)
        assert info2.value.fields == [FIELD]
        assert str(info2.value).replace("absent", "planted") == str(info.value)


@pytest.mark.parametrize("prefix", ALLOWED)
def test_caller_prefixes_and_finished_checkpoints_are_accepted(client, planted, prefix):  # type: ignore[no-untyped-def]
    # size 25 is not a multiple of the UNet's 2: the one violation, so nothing trains.
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        _create(client, planted, prefix, size=25)
    assert info.value.fields == ["params[size]"], (prefix, str(info.value))


def test_catalog_model_refs_still_resolve(client, planted, registered_models):  # type: ignore[no-untyped-def]
    assert "cells-tiny" in registered_models
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        _create(client, planted, "cells-tiny", size=25)
    assert info.value.fields == ["params[size]"], str(info.value)
