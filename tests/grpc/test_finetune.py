"""Finetune service through the running stack: SDK → gRPC → service → worker processes → store,
and promote → Triton → generator. Tiny models, phantom data, few steps.

Every job kind runs to completion here with its loss falling; the jobs are submitted together
at module start (the queue runs three at once) so the workers share the two cores' time.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
import pytest

import clinisynth
from clinisynth.v1 import finetune_pb2, finetune_pb2_grpc

pytestmark = pytest.mark.stack

CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
FAST = {"batch_size": 8, "learning_rate": 2e-3, "log_every": 5, "seed": 3}


@pytest.fixture(scope="module")
def ft_home(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def data(store, ft_home) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Phantom data sets in the store: cells ImageFolder, feedback export, chest manifest."""
    from clinisynth_lab import builders
    from clinisynth_lab.phantoms import cells, datasets

    imgs, labels = cells.generate(48, seed=11, size=24)
    datasets.write_image_folder_to_store(store, "ft/cells", imgs, labels, CLASSES)
    # Feedback: real phantoms shown with their class are plausible, with a wrong class not.
    fb_imgs, fb_labels = cells.generate(48, seed=12, size=24)
    wrong = (fb_labels + 1 + np.arange(48) % 3) % 4
    plausible = np.arange(48) % 2 == 0
    shown = np.where(plausible, fb_labels, wrong)
    datasets.write_feedback_to_store(
        store,
        "ft/feedback",
        fb_imgs,
        [CLASSES[i] for i in shown],
        plausible.tolist(),
        generator="cells-tiny@1",
    )
    # Chest-like image–text pairs: bright blob left / right.
    rng = np.random.default_rng(0)
    chest, texts = [], []
    for i in range(12):
        img = np.full((32, 32), 40, np.uint8)
        side = i % 2
        img[8:24, 4 + 16 * side : 12 + 16 * side] = 200 + rng.integers(0, 40)
        chest.append(img)
        texts.append("left pleural effusion" if side == 0 else "right pleural effusion")
    datasets.write_manifest_to_store(store, "ft/chest", np.stack(chest), texts)
    sd = builders.build_text_to_image(ft_home / "sd-base", size=32, image_channels=1)
    store.upload_dir(sd, "ft/models/sd-base")
    return {
        "cells": "ft/cells",
        "feedback": "ft/feedback",
        "chest": "ft/chest",
        "sd": "ft/models/sd-base",
    }


@pytest.fixture(scope="module")
def finetune_server(triton_server, store_url, ft_home, model_repository):  # type: ignore[no-untyped-def]
    from conftest import start_service

    running = start_service(
        "finetune",
        triton_server.grpc_url,
        store_url,
        ft_home,
        max_concurrent_jobs="3",
        workdir=str(ft_home / "work"),
        heartbeat_s="0.5",
        poll_s="0.2",
        heartbeat_timeout_s="60",
        model_repository=str(model_repository),
        torch_threads="1",
    )
    yield running
    client = clinisynth.Client(endpoints={"finetune": running.address}, timeout=30)
    for job in client.finetune.list():  # leave no worker behind
        if not job.done:
            client.finetune.cancel(job.id)
    client.close()
    running.stop(0)


@pytest.fixture(scope="module")
def client(finetune_server):  # type: ignore[no-untyped-def]
    with clinisynth.Client(endpoints={"finetune": finetune_server.address}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def jobs(client, data) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The first jobs of every kind, queued together (reward_finetune needs two of them)."""
    return {
        "diffusion": client.finetune.create(
            "diffusion_pretrain",
            data["cells"],
            params={
                **FAST,
                "max_steps": 30,
                "checkpoint_every": 15,
                "block_out_channels": "16,32",
                "ema": True,
                "ema_decay": 0.9,
                "prediction_type": "v_prediction",
            },
            model_name="cells-ft",
        ).id,
        "reward": client.finetune.create(
            "reward_model",
            data["feedback"],
            params={
                **FAST,
                "max_steps": 30,
                "checkpoint_every": 10,
                "backbone_width": 8,
                "classes": ",".join(CLASSES),
                "batch_size": 16,
            },
        ).id,
        "classifier": client.finetune.create(
            "classifier",
            data["cells"],
            params={
                **FAST,
                "max_steps": 30,
                "checkpoint_every": 15,
                "backbone_width": 8,
                "adversarial": "pgd",
                "eps": 0.3,
                "attack_steps": 2,
                "val_fraction": 0.25,
            },
        ).id,
        "t2i": client.finetune.create(
            "text_to_image_adaptation",
            data["chest"],
            params={
                **FAST,
                "batch_size": 4,
                "max_steps": 12,
                "checkpoint_every": 6,
                "log_every": 4,
                "base_model": data["sd"],
                "method": "lora",
                "lora_rank": 4,
                "train_text_encoder": True,
                "prior_preservation": True,
                "prior_prompt": "a chest x-ray",
                "num_prior_images": 2,
                "prior_steps": 2,
                "textual_inversion_token": "<effusion>",
                "initializer_token": "effusion",
            },
        ).id,
    }


def wait_done(client, job_id: str, timeout_s: float = 240):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    for _ in client.finetune.watch(job_id, timeout=timeout_s):
        pass  # the stream ends when the job has ended
    job = client.finetune.get(job_id)
    while not job.done and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.finetune.get(job_id)
    return job


def losses(client, job_id: str) -> list[float]:  # type: ignore[no-untyped-def]
    return [
        e.metrics["loss"]
        for e in client.finetune.watch(job_id)
        if e.type == "progress" and "loss" in e.metrics
    ]


def assert_trained(client, job_id: str):  # type: ignore[no-untyped-def]
    job = wait_done(client, job_id)
    assert job.state == "succeeded", job.failure_reason
    assert job.step == job.max_steps
    curve = losses(client, job_id)
    assert len(curve) >= 2 and curve[-1] < curve[0], curve
    return job


# ---------------------------------------------------------------------------------------------
# validation, kinds, data sets
# ---------------------------------------------------------------------------------------------


def test_several_nodes_on_the_local_launcher_are_refused_at_create(client, data, jobs):  # type: ignore[no-untyped-def]
    """Not accepted and failed later: the local launcher runs one machine's processes."""
    with pytest.raises(clinisynth.InvalidArgumentError) as err:
        client.finetune.create(
            "diffusion_pretrain", data["cells"], params={"nnodes": 2, "max_steps": 2}
        )
    by_field = {v.field: v.description for v in err.value.field_violations}
    assert "kubernetes launcher" in by_field["params[nnodes]"], by_field
    assert set(by_field) == {"params[nnodes]"}  # the rest of the request is fine


def test_create_reports_every_problem_at_once(client, data, jobs):  # type: ignore[no-untyped-def]
    with pytest.raises(clinisynth.InvalidArgumentError) as err:
        client.finetune.create(
            "diffusion_pretrain",
            "ft/nothing-here",
            params={"max_steps": "many", "learning_rat": 1e-3, "ema": "perhaps"},
        )
    fields = {v.field for v in err.value.field_violations}
    assert {"params[max_steps]", "params[learning_rat]", "params[ema]", "dataset"} <= fields
    text = " ".join(v.description for v in err.value.field_violations)
    assert "did you mean learning_rate" in text and "empty or missing" in text

    with pytest.raises(clinisynth.InvalidArgumentError) as err:
        client.finetune.create("paint_by_numbers", data["cells"])
    assert [v.field for v in err.value.field_violations] == ["kind"]


def test_bad_data_fails_validation_before_training(client, store, data):  # type: ignore[no-untyped-def]
    store.put_bytes("ft/broken/lymphocyte/0.png", b"not a png at all")
    store.put_bytes(
        "ft/broken/stray.png", store.get_bytes(next(iter(store.list("ft/cells/monocyte/"))).key)
    )
    with pytest.raises(clinisynth.InvalidArgumentError) as err:
        client.finetune.create("classifier", "ft/broken")
    text = "\n".join(v.description for v in err.value.field_violations)
    assert "lymphocyte/0.png: unreadable image" in text
    assert "stray.png: image outside a class folder" in text
    # Unknown class against the base model of a fine-tuning job.
    with pytest.raises(clinisynth.InvalidArgumentError) as err:
        client.finetune.create(
            "reward_finetune",
            data["cells"],
            params={"base_model": data["sd"], "reward_model": "no-such-model"},
        )
    by_field = {v.field: v.description for v in err.value.field_violations}
    assert "not a pixel" in by_field["params[base_model]"] or "pixel" in str(by_field)
    assert "params[reward_model]" in by_field
    report = client.finetune.validate_dataset("ft/broken")
    assert not report.ok and len(report.problems) == 2


def test_kinds_list_params_with_defaults(client):  # type: ignore[no-untyped-def]
    kinds = {k.name: k for k in client.finetune.kinds()}
    assert set(kinds) == {
        "diffusion_pretrain",
        "text_to_image_adaptation",
        "reward_model",
        "reward_finetune",
        "classifier",
    }
    for kind in kinds.values():
        names = {p.name for p in kind.params}
        assert {"max_steps", "batch_size", "learning_rate", "seed", "checkpoint_every"} <= names
    beta = next(p for p in kinds["reward_finetune"].params if p.name == "beta")
    assert (beta.type, beta.default) == ("float", "0.3")
    adv = next(p for p in kinds["classifier"].params if p.name == "adversarial")
    assert adv.choices == ["none", "pgd", "trades"]


def test_upload_checks_sha256_and_cli_data_upload(
    client,
    finetune_server,
    tmp_path,  # type: ignore[no-untyped-def]
    monkeypatch,
    capsys,
):
    from clinisynth.cli import main
    from clinisynth_lab.phantoms.datasets import encode_png

    stub = finetune_pb2_grpc.FinetuneServiceStub(client._t.channel("finetune"))
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        stub.UploadDatasetFile(
            iter(
                [
                    finetune_pb2.UploadChunk(
                        key="datasets/ft-up/a.bin", data=b"abc", sha256="00" * 32
                    )
                ]
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mismatch" in err.value.details()

    folder = tmp_path / "local"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(2):
            (folder / cls / f"{i}.png").write_bytes(encode_png(np.full((8, 8), 60 * i, np.uint8)))
    monkeypatch.setenv("CLINISYNTH_FINETUNE_ADDRESS", finetune_server.address)
    assert main(["data", "upload", str(folder), "datasets/ft-uploaded", "--json", "-q"]) == 0
    out = capsys.readouterr().out
    assert '"images": 4' in out and '"problems": []' in out
    (folder / "stray.png").write_bytes(b"junk")
    assert main(["data", "upload", str(folder), "datasets/ft-uploaded2", "-q"]) == 2
    assert "outside a class folder" in capsys.readouterr().err


def test_idempotent_create_queue_positions_and_cancel(client, data, jobs):  # type: ignore[no-untyped-def]
    # Three workers are busy with the module's jobs: these two wait in order.
    params = {**FAST, "max_steps": 5, "block_out_channels": "16,32"}
    a = client.finetune.create(
        "diffusion_pretrain", data["cells"], params=params, request_id="same-request"
    )
    again = client.finetune.create(
        "diffusion_pretrain", data["cells"], params=params, request_id="same-request"
    )
    b = client.finetune.create("diffusion_pretrain", data["cells"], params=params)
    assert again.id == a.id
    a, b = client.finetune.get(a.id), client.finetune.get(b.id)
    if a.state == "queued" and b.state == "queued":
        assert b.queue_position == a.queue_position + 1
    queued_ids = {j.id for j in client.finetune.list(state="queued")}
    assert b.id in queued_ids or client.finetune.get(b.id).state != "queued"
    for job in (a, b):
        assert client.finetune.cancel(job.id).state == "cancelled"
    assert client.finetune.cancel(a.id).state == "cancelled"  # a no-op once ended
    with pytest.raises(clinisynth.FailedPreconditionError):
        client.finetune.cancel(a.id, strict=True)
    cancelled = client.finetune.list(state="cancelled", kind="diffusion_pretrain")
    assert {a.id, b.id} <= {j.id for j in cancelled}


# ---------------------------------------------------------------------------------------------
# every kind to completion, loss falling
# ---------------------------------------------------------------------------------------------


def test_diffusion_pretrain_runs_to_completion(client, jobs, store):  # type: ignore[no-untyped-def]
    import json

    job = assert_trained(client, jobs["diffusion"])
    checkpoints = client.finetune.checkpoints(job.id)
    assert [c.step for c in checkpoints] == [15, 30]
    assert checkpoints[-1].best  # generators: the newest is best
    # v-prediction (asked for) reaches the scheduler config every sampler and trainer reads
    sched = json.loads(store.get_bytes(checkpoints[-1].key + "scheduler/scheduler_config.json"))
    assert sched["prediction_type"] == "v_prediction"
    events = list(client.finetune.watch(job.id))
    assert [e.sequence for e in events] == sorted({e.sequence for e in events})
    types = {e.type for e in events}
    assert {"state", "progress", "checkpoint", "log"} <= types
    states = [e.state for e in events if e.type == "state"]
    assert states == ["queued", "running", "succeeded"]
    later = list(client.finetune.watch(job.id, since=events[-3].sequence))
    assert [e.sequence for e in later] == [e.sequence for e in events[-2:]]


def test_reward_model_keeps_best_validation_checkpoint(client, jobs):  # type: ignore[no-untyped-def]
    job = assert_trained(client, jobs["reward"])
    checkpoints = client.finetune.checkpoints(job.id)
    best = [c for c in checkpoints if c.best]
    assert len(best) == 1
    assert best[0].metrics["val_accuracy"] == max(c.metrics["val_accuracy"] for c in checkpoints)
    assert "val_majority_baseline" in best[0].metrics


def test_classifier_robust_runs_to_completion(client, jobs, store):  # type: ignore[no-untyped-def]
    import json

    job = assert_trained(client, jobs["classifier"])
    best = next(c for c in client.finetune.checkpoints(job.id) if c.best)
    assert {"val_accuracy", "val_robust_accuracy"} <= set(best.metrics)
    meta = json.loads(store.get_bytes(best.key + "clinisynth.json"))
    assert meta["kind"] == "classifier" and meta["adversarial"] == "pgd"
    assert meta["classes"] == sorted(CLASSES) and meta["temperature"] > 0


def test_text_to_image_lora_prior_textual_inversion(client, jobs, store):  # type: ignore[no-untyped-def]
    job = assert_trained(client, jobs["t2i"])
    ckpt = client.finetune.checkpoints(job.id)[-1]
    keys = {i.key[len(ckpt.key) :] for i in store.list(ckpt.key)}
    assert {
        "unet/config.json",
        "text_encoder/config.json",
        "vae/config.json",
        "tokenizer/tokenizer_config.json",
        "model_index.json",
    } <= keys
    assert not any("lora" in k for k in keys)  # adapters merged: a plain pipeline folder
    events = list(client.finetune.watch(job.id))
    assert any("prior images" in e.message for e in events)
    progress = [e for e in events if e.type == "progress"]
    assert "loss_prior" in progress[-1].metrics


def test_reward_finetune_with_store_prefix_models(client, jobs, data):  # type: ignore[no-untyped-def]
    base = wait_done(client, jobs["diffusion"])
    reward = wait_done(client, jobs["reward"])
    assert base.state == reward.state == "succeeded"
    base_ckpt = client.finetune.checkpoints(base.id)[0].key  # step 15: still much to learn
    reward_ckpt = next(c for c in client.finetune.checkpoints(reward.id) if c.best).key
    job = client.finetune.create(
        "reward_finetune",
        data["cells"],
        params={
            **FAST,
            "batch_size": 16,
            "max_steps": 30,
            "checkpoint_every": 15,
            "log_every": 10,
            "base_model": base_ckpt,
            "reward_model": reward_ckpt,
            "pool_size": 8,
            "pool_steps": 2,
            "rounds": 2,
            "beta": 1.0,
        },
    )
    done = assert_trained(client, job.id)
    events = list(client.finetune.watch(done.id))
    pools = [e.message for e in events if e.message.startswith("round ")]
    assert len(pools) == 2 and "mean reward" in pools[0]  # a fresh pool each round
    last = [e for e in events if e.type == "progress"][-1].metrics
    assert {"loss_real", "loss_synthetic", "pool_reward"} <= set(last)
    assert 0.0 < last["pool_reward"] < 1.0


# ---------------------------------------------------------------------------------------------
# promote: a checkpoint becomes a Triton model version the generator serves
# ---------------------------------------------------------------------------------------------


def test_promote_serves_new_version_and_keeps_previous(
    client,
    jobs,
    triton_server,
    store_url,  # type: ignore[no-untyped-def]
    ft_home,
    triton_client,
):
    from conftest import start_service

    job = wait_done(client, jobs["diffusion"])
    first = client.finetune.promote(job.id, "000000015")
    assert (first.model.name, first.model.version, first.previous_version) == ("cells-ft", "1", "")
    assert first.model.kind == "class_conditional" and first.model.classes == sorted(CLASSES)
    second = client.finetune.promote(job.id)  # the best = the last checkpoint
    assert (second.model.version, second.previous_version) == ("2", "1")
    assert second.model.labels["finetune_job"] == job.id

    generator = start_service("generator", triton_server.grpc_url, store_url, ft_home)
    try:
        with clinisynth.Client(endpoints={"generator": generator.address}, timeout=120) as gen:
            versions = {m.version for m in gen.list_models(name="cells-ft", all_versions=True)}
            assert versions == {"1", "2"}
            new = gen.generate("cells-ft", class_name="eosinophil", seed=1, steps=3)
            old = gen.generate("cells-ft@1", class_name="eosinophil", seed=1, steps=3)
        assert new.images[0].provenance["model"]["version"] in ("2", 2)
        assert old.images[0].to_numpy().shape == (24, 24)
        assert not np.array_equal(new.images[0].to_numpy(), old.images[0].to_numpy())
    finally:
        generator.stop(0)
    assert triton_client.model_ready("cells-ft.denoiser", "1")
    assert triton_client.model_ready("cells-ft.denoiser", "2")


def test_promote_scorer_needs_its_triton_role(client, jobs):  # type: ignore[no-untyped-def]
    """Reward / classifier folders promote once their Triton roles exist (other issues)."""
    from clinisynth_server.triton import repository

    job = wait_done(client, jobs["reward"])
    try:
        repository.role_module("reward_scorer")
    except Exception:
        with pytest.raises(clinisynth.FailedPreconditionError) as err:
            client.finetune.promote(job.id)
        assert "reward_scorer" in str(err.value)
        return
    result = client.finetune.promote(job.id, model_name="cells-reward-ft")
    assert result.model.kind == "reward"


def test_cli_create_list_get_checkpoints_kinds(
    finetune_server,
    jobs,
    data,
    monkeypatch,  # type: ignore[no-untyped-def]
    capsys,
):
    import json

    from clinisynth.cli import main

    monkeypatch.setenv("CLINISYNTH_FINETUNE_ADDRESS", finetune_server.address)
    assert main(["finetune", "kinds"]) == 0
    assert "reward_finetune" in capsys.readouterr().out
    assert main(["finetune", "get", jobs["classifier"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "classifier"
    assert main(["finetune", "list", "--json"]) == 0
    assert jobs["reward"] in {j["id"] for j in json.loads(capsys.readouterr().out)}
    assert (
        main(
            [
                "finetune",
                "create",
                "--kind",
                "classifier",
                "--data",
                data["cells"],
                "--set",
                "max_steps=2",
                "--set",
                "backbone_width=4",
            ]
        )
        == 0
    )
    new_id = capsys.readouterr().out.strip()
    assert new_id.startswith("ft-")
    assert main(["finetune", "cancel", new_id]) == 0
    assert "cancelled" in capsys.readouterr().out
    wait_done(
        clinisynth.Client(endpoints={"finetune": finetune_server.address}), jobs["classifier"]
    )
    assert main(["finetune", "checkpoints", jobs["classifier"], "--json"]) == 0
    assert any(c["best"] for c in json.loads(capsys.readouterr().out))
    assert main(["finetune", "watch", jobs["classifier"]]) == 0  # replays, then ends
    captured = capsys.readouterr()
    assert "succeeded" in captured.out and "checkpoint" in captured.out + captured.err
    assert main(["finetune", "create", "--kind", "classifier", "--data", "ft/none"]) == 2


def test_metrics_families(finetune_server, jobs, client):  # type: ignore[no-untyped-def]
    import urllib.request

    wait_done(client, jobs["diffusion"])
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{finetune_server.metrics_port}/metrics")
        .read()
        .decode()
    )
    assert 'clinisynth_finetune_jobs{kind="diffusion_pretrain",state="succeeded"}' in text
    # A finished job's live series are gone.
    assert f'job="{jobs["diffusion"]}"' not in text


def test_async_client_twins(finetune_server, jobs):  # type: ignore[no-untyped-def]
    import asyncio

    async def run() -> tuple[list[str], str, int]:
        async with clinisynth.AsyncClient(
            endpoints={"finetune": finetune_server.address}, timeout=60
        ) as client:
            kinds = [k.name for k in await client.finetune.kinds()]
            job = await client.finetune.wait(jobs["classifier"])
            checkpoints = await client.finetune.checkpoints(job.id)
            return kinds, job.state, len(checkpoints)

    kinds, state, n = asyncio.run(run())
    assert "classifier" in kinds and state == "succeeded" and n == 2
