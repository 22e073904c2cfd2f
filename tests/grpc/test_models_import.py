"""Bring your own model through the running stack: import → generate → alias → delete.

Real Triton, real gRPC, the SDK over the finetune and generator services; the folders are the
tiny Stable Diffusion and DDPM folders the other stack tests build from configs.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import clinisynth
from clinisynth_lab import builders
from tests.conftest import import_services


@pytest.fixture(scope="module")
def folders(session_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    base = session_dir / "byom"
    return {
        "sd": builders.build_text_to_image(base / "sd", size=32, image_channels=1),
        "ddpm": builders.build_pixel_unet(base / "ddpm", size=16, classes=["a", "b"]),
    }


@pytest.fixture(scope="module")
def services(triton_server, store_url, session_dir, model_repository) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    home = session_dir / "byom-home"
    with import_services(
        "generator", triton_server.grpc_url, store_url, home, model_repository
    ) as endpoints:
        yield endpoints


@pytest.fixture()
def client(services: dict[str, str]) -> Iterator[clinisynth.Client]:
    with clinisynth.Client(endpoints=services, timeout=300) as c:
        yield c


def poll(check: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    """``check()`` until it returns something truthy (catalog caches live ~2 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def refused(client: clinisynth.Client, model: str, **kw: Any) -> clinisynth.ClinisynthError | None:
    """The FAILED_PRECONDITION a retired version gets; None while a cache still serves it."""
    try:
        client.generate(model, seed=1, steps=2, **kw)
    except clinisynth.FailedPreconditionError as err:
        return err
    except clinisynth.ClinisynthError:
        return None  # the version's Triton model went before the generator's catalog cache
    return None


# -- validation: every problem named by field, nothing reaches Triton -----------------------------
def _drop(sub: str) -> Callable[[pathlib.Path], None]:
    return lambda f: shutil.rmtree(f / sub)


def _edit(rel: str, **changes: Any) -> Callable[[pathlib.Path], None]:
    def apply(f: pathlib.Path) -> None:
        data = json.loads((f / rel).read_text())
        data.update(changes)
        (f / rel).write_text(json.dumps(data))

    return apply


def _pickle_unet(f: pathlib.Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights = f / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), f / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()


BROKEN = {
    "no tokenizer": (_drop("tokenizer"), "source.tokenizer"),
    "no scheduler": (_drop("scheduler"), "source.scheduler"),
    "no text encoder": (_drop("text_encoder"), "source.text_encoder"),
    "no vae": (_drop("vae"), "source.vae"),
    "no unet": (_drop("unet"), "source.unet"),
    "cross attention": (
        _edit("unet/config.json", cross_attention_dim=48),
        "source.unet.cross_attention_dim",
    ),
    "latent channels": (_edit("vae/config.json", latent_channels=8), "source.vae.latent_channels"),
    "pipeline class": (
        _edit("model_index.json", _class_name="KandinskyPipeline"),
        "source.model_index._class_name",
    ),
    "pickle weights": (_pickle_unet, "source.unet.weights"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_folder_problem_is_invalid_argument_by_field(
    client, folders, tmp_path, model_repository, case
):  # type: ignore[no-untyped-def]
    breaker, field = BROKEN[case]
    folder = shutil.copytree(folders["sd"], tmp_path / "sd")
    breaker(folder)
    name = f"broken-{case.replace(' ', '-')}"
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.import_model(folder, name=name)
    assert field in info.value.fields, info.value.fields
    assert not (model_repository / f"{name}.denoiser").exists()  # nothing reached Triton
    with pytest.raises(clinisynth.InvalidArgumentError):
        client.get_model(name)


def test_bad_options_are_invalid_argument_by_field(client, folders):  # type: ignore[no-untyped-def]
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.import_model(
            folders["ddpm"],
            name="bad options!",
            dtype="float64",
            device="tpu",
            instances=99,
            max_batch_size=100_000,
            labels={"bad key!": "x"},
            replay="sometimes",
        )
    assert set(info.value.fields) == {
        "name",
        "dtype",
        "device",
        "replay",
        "instances",
        "max_batch_size",
        "labels[bad key!]",
    }
    for source, field in (("catalog/x", "source"), ("imports/../x", "source"), ("", "source")):
        with pytest.raises(clinisynth.InvalidArgumentError) as info:
            client.import_model(source, name="ok")
        assert info.value.fields == [field]


def test_bad_component_options_are_invalid_argument_by_field(client, folders):  # type: ignore[no-untyped-def]
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.import_model(
            folders["sd"],
            name="bad-components",
            component_dtypes={"vae": "float64", "decoder": "float32"},
            component_devices={"unet": "tpu"},
        )
    assert set(info.value.fields) == {
        "component_dtypes[vae]",
        "component_dtypes[decoder]",
        "component_devices[unet]",
    }
    # A component the folder does not have (a DDPM folder is a U-Net alone).
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.import_model(folders["ddpm"], name="no-vae", component_dtypes={"vae": "float32"})
    assert info.value.fields == ["component_dtypes[vae]"]


def test_pickle_weights_when_allowed_load_with_weights_only(folders, tmp_path):  # type: ignore[no-untyped-def]
    from clinisynth_server.finetune.imports import validate_folder

    folder = shutil.copytree(folders["sd"], tmp_path / "sd")
    _pickle_unet(folder)
    assert [v.field for v in validate_folder(folder)] == ["source.unet.weights"]
    assert validate_folder(folder, allow_pickle=True) == []
    # A pickle that needs code to load is refused even when pickle weights are allowed.
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(
        b"\x80\x04cos\nsystem\n(S'true'\ntR."
    )
    assert [v.field for v in validate_folder(folder, allow_pickle=True)] == ["source.unet.weights"]


def test_upload_namespace_is_confined(client, services):  # type: ignore[no-untyped-def]
    from clinisynth import _finetune as ft
    from clinisynth import _models as md

    for key in ("imports/x", "datasets/a/b.png", "catalog/x/1.json", "imports/../catalog/x"):
        with pytest.raises(clinisynth.InvalidArgumentError) as info:
            client._t.call(
                md.UPLOAD_MODEL_FILE, iter([ft.finetune_pb2.UploadChunk(key=key, data=b"x")])
            )
        assert info.value.fields == ["key"]
    # and the data-set upload cannot write into imports/
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.finetune._t.call(
            ft.UPLOAD_DATASET_FILE,
            iter([ft.finetune_pb2.UploadChunk(key="imports/u1/a", data=b"x")]),
        )
    assert info.value.fields == ["key"]


# -- the whole life of an imported model ----------------------------------------------------------
def test_sd_folder_import_generate_alias_delete(client, folders):  # type: ignore[no-untyped-def]
    events: list[clinisynth.ProgressEvent] = []
    details = client.import_model(
        folders["sd"],
        name="byom-sd",
        description="my own SD",
        labels={"site": "a"},
        max_batch_size=4,
        progress=events.append,
    )
    files = sum(1 for p in folders["sd"].rglob("*") if p.is_file())
    assert [e.step for e in events if e.stage == "upload"] == list(range(1, files + 1))
    # Then the server's stages, as they run: each component written, then loaded in Triton.
    stages = [(e.stage, e.message.split()[-1]) for e in events if e.stage != "upload"]
    parts = [f"byom-sd.{r}" for r in ("denoiser", "text_encoder", "vae_decode")]
    assert [s for s, _ in stages] == ["fetch", "validate"] + ["write"] * 3 + ["load"] * 3 + [
        "record"
    ]
    assert [w for s, w in stages if s in ("write", "load")] == parts + parts
    assert [e.step for e in events if e.stage != "upload"] == list(range(1, 10))
    assert {e.total_steps for e in events if e.stage != "upload"} == {9}
    assert details.model.kind == "text_to_image" and details.version == "1"
    assert {c.role for c in details.components} == {"denoiser", "text_encoder", "vae_decode"}
    assert all(c.ready for c in details.components)
    assert (details.dtype, details.device, details.max_batch_size) == ("float32", "cpu", 4)
    assert details.size_bytes > 0 and details.source.startswith("imports/u")
    assert details.model.labels["site"] == "a" and details.scheduler == "DDIMScheduler"

    first = client.generate("byom-sd@1", prompt="a chest x-ray", seed=5, steps=2)
    assert first.images[0].provenance["model"]["version"] == "1"

    client.alias_model("byom-sd@1", "stable")
    assert client.get_model("byom-sd@stable").version == "1"
    by_alias = poll(
        lambda: _try(
            lambda: client.generate("byom-sd@stable", prompt="a chest x-ray", seed=5, steps=2)
        ),
        "the generator sees the alias",
    )
    np.testing.assert_array_equal(by_alias.images[0].to_numpy(), first.images[0].to_numpy())
    assert by_alias.images[0].provenance["model"]["version"] == "1"

    gone = client.delete_model("byom-sd@1")
    assert gone.retired and not any(c.ready for c in gone.components)
    err = poll(
        lambda: refused(client, "byom-sd@1", prompt="x"), "generate refuses a retired version"
    )
    assert err.reason == "MODEL_RETIRED"
    assert refused(client, "byom-sd@stable", prompt="x") is not None  # the alias points at it
    # Provenance of the old image still resolves, to the same weights.
    shown = client.get_model("byom-sd@1")
    assert shown.retired and shown.model.digest == details.model.digest
    assert {m.version for m in client.list_models(name="byom-sd", all_versions=True)} == set()
    with pytest.raises(clinisynth.FailedPreconditionError):
        client.alias_model("byom-sd@1", "back")


def test_bfloat16_import_keeps_the_vae_float32_and_generates(client, folders):  # type: ignore[no-untyped-def]
    events: list[clinisynth.ProgressEvent] = []
    details = client.import_model(
        folders["sd"],
        name="byom-bf16",
        dtype="bfloat16",
        component_dtypes={"vae": "float32"},
        progress=events.append,
    )
    assert (details.dtype, details.device) == ("bfloat16", "cpu")
    assert {c.role: (c.dtype, c.device) for c in details.components} == {
        "denoiser": ("bfloat16", "cpu"),
        "text_encoder": ("bfloat16", "cpu"),
        "vae_decode": ("float32", "cpu"),
    }
    writes = [e.message for e in events if e.stage == "write"]
    assert any("(float32 on cpu) byom-bf16.vae_decode" in m for m in writes), writes
    assert client.get_model("byom-bf16@1").components == details.components
    result = client.generate("byom-bf16@1", prompt="a chest x-ray", seed=5, steps=2, format="raw")
    pixels = result.images[0].to_numpy()
    assert pixels.shape[:2] == (32, 32) and np.isfinite(pixels).all()
    client.delete_model("byom-bf16@1")


def _try(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except clinisynth.InvalidArgumentError:
        return None


def test_ddpm_folder_import_reimport_generate_delete(client, folders):  # type: ignore[no-untyped-def]
    details = client.import_model(folders["ddpm"], name="byom-ddpm", instances=1)
    assert details.model.kind == "class_conditional" and details.model.classes == ["a", "b"]
    assert [c.role for c in details.components] == ["denoiser"] and details.components[0].ready
    image = client.generate(f"byom-ddpm@{details.version}", class_name="b", seed=2, steps=2)
    assert image.images[0].to_numpy().shape[:2] == (16, 16)
    assert image.images[0].provenance["replay"].startswith("bit-identical")  # the default

    # The same folder again: every file is already uploaded (resumed), and a new version results.
    again: list[clinisynth.ProgressEvent] = []
    second = client.import_model(folders["ddpm"], name="byom-ddpm", progress=again.append)
    assert int(second.version) == int(details.version) + 1
    uploads = [e for e in again if e.stage == "upload"]
    assert uploads and all(e.message.endswith("(already uploaded)") for e in uploads)

    client.delete_model(f"byom-ddpm@{details.version}")
    assert client.get_model(f"byom-ddpm@{details.version}").retired
    listed = {m.version for m in client.list_models(name="byom-ddpm", all_versions=True)}
    assert listed == {second.version}
    served = poll(
        lambda: _try(lambda: client.generate("byom-ddpm", class_name="a", seed=1, steps=2)),
        "the generator serves the newer version",
    )
    assert served.images[0].provenance["model"]["version"] == second.version
    client.delete_model(f"byom-ddpm@{second.version}")
    err = poll(lambda: refused(client, "byom-ddpm", class_name="a"), "every version retired")
    assert err.reason == "MODEL_RETIRED"


def test_batched_replay_import_is_stated_in_provenance(client, folders):  # type: ignore[no-untyped-def]
    """--replay batched: rows share forward passes; every image says so in its provenance."""
    details = client.import_model(folders["ddpm"], name="byom-batched", replay="batched")
    ref = f"byom-batched@{details.version}"
    image = client.generate(ref, class_name="a", seed=3, steps=2)
    assert image.images[0].provenance["replay"].startswith("close:")
    client.delete_model(ref)


# -- durability: a killed import leaves no version; the next one succeeds --------------------------
def test_killed_import_leaves_no_version_and_reimport_succeeds(  # type: ignore[no-untyped-def]
    client, folders, triton_server, store_url, model_repository, session_dir, store
):
    from clinisynth_lab.benchmarks.memory import serve_process
    from clinisynth_server.catalog import Catalog

    env = {
        **os.environ,
        "CLINISYNTH_STORE_URL": store_url,
        "CLINISYNTH_TRITON_URL": triton_server.grpc_url,
        "CLINISYNTH_TRITON_KEY_FILE": str(triton_server.key_file),
        "CLINISYNTH_FINETUNE_MODEL_REPOSITORY": str(model_repository),
        "CLINISYNTH_FINETUNE_WORKDIR": str(session_dir / "byom-kill"),
        "PYTHONUNBUFFERED": "1",
    }
    log = session_dir / "byom-kill.log"
    with open(log, "ab") as err:
        proc, address, _ = serve_process("finetune", env, stderr=err)
    outcome: list[BaseException | object] = []
    loading = threading.Event()

    def seen(event: clinisynth.ProgressEvent) -> None:
        if event.stage == "load":
            loading.set()

    def run() -> None:
        try:
            with clinisynth.Client(endpoints={"finetune": address}, timeout=300, retries=0) as c:
                outcome.append(c.import_model(folders["ddpm"], name="byom-killed", progress=seen))
        except BaseException as exc:  # the kill ends the call: UNAVAILABLE
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # Killed while Triton loads the component it wrote: the catalog record comes last.
        assert loading.wait(120) or proc.poll() is not None, "no load event"
        assert (model_repository / "byom-killed.denoiser" / "1").is_dir()
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        thread.join(60)
    assert outcome and isinstance(outcome[0], clinisynth.ClinisynthError), outcome
    assert Catalog(store, ttl_s=0).versions("byom-killed") == []  # type: ignore[arg-type]
    with pytest.raises(clinisynth.InvalidArgumentError):
        client.get_model("byom-killed")

    details = client.import_model(folders["ddpm"], name="byom-killed")
    assert details.version == "2" and all(c.ready for c in details.components)
    # The half-registered leftover went from the repository (Triton would load it beside v2).
    assert not (model_repository / "byom-killed.denoiser" / "1").exists()
    result = poll(
        lambda: _try(lambda: client.generate("byom-killed", class_name="a", seed=1, steps=2)),
        "the generator serves the re-import",
    )
    assert result.images[0].provenance["model"]["version"] == "2"


# -- the CLI, once ---------------------------------------------------------------------------------
def test_cli_models_import_and_list(services, folders):  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "CLINISYNTH_FINETUNE_ADDRESS": services["finetune"],
        "CLINISYNTH_GENERATOR_ADDRESS": services["generator"],
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "clinisynth", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = cli(
        "models", "import", str(folders["ddpm"]), "--name", "byom-cli",
        "--label", "site=b", "--max-batch", "8", "--component-dtype", "unet=bfloat16", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["model"]["name"] == "byom-cli" and shown["max_batch_size"] == 8
    assert [(c["dtype"], c["device"]) for c in shown["components"]] == [("bfloat16", "cpu")]
    listed = json.loads(cli("models", "list", "--json").stdout)
    assert {"name": "byom-cli", "version": shown["model"]["version"]}.items() <= next(
        m for m in listed if m["name"] == "byom-cli"
    ).items()
    bad = cli("models", "import", str(folders["ddpm"]), "--name", "bad name!")
    assert bad.returncode == 2 and "name:" in bad.stderr
    text = cli("models", "show", "byom-cli")
    assert text.returncode == 0 and "component:   denoiser" in text.stdout
    assert "bfloat16 on cpu" in text.stdout
    bad = cli("models", "import", str(folders["ddpm"]), "--name", "x", "--component-dtype", "vae")
    assert bad.returncode != 0 and "--component-dtype expects key=value" in bad.stderr
