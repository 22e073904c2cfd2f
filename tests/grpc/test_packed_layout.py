"""The packed serving layout through the running stack: SDK → finetune / generator → real Triton.

The same tiny Stable Diffusion and DDPM folders are imported twice, ``layout="split"`` (a
Triton model per component) and ``layout="packed"`` (one Triton model whose process holds
every component). Generating with the same seed and settings gives the same pixels, bit for
bit: the raw float32 arrays and the PNG's pixel chunks (the replay contract's notion of
identical, tests/grpc/test_replay_contract.py); a reward folder imported both ways scores the
same images alike through the reward service. A packed model runs one python-backend process
per instance, counted among Triton's child processes by their ``model.py`` path; deleting its
only version unloads it (its processes exit) and removes it from the repository.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import clinisynth
from clinisynth_lab import builders
from clinisynth_lab.benchmarks import hostload
from clinisynth_server.errors import InvalidArgument
from clinisynth_server.imaging.decode import _png_pixel_chunks
from tests.conftest import import_services

pytestmark = pytest.mark.stack

ROLES = {"denoiser", "text_encoder", "vae_decode"}


@pytest.fixture(scope="module")
def folders(session_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    base = session_dir / "packed-folders"
    return {
        "sd": builders.build_text_to_image(base / "sd", size=32, image_channels=1),
        "ddpm": builders.build_pixel_unet(base / "ddpm", size=16, classes=["a", "b"]),
    }


@pytest.fixture(scope="module")
def services(triton_server, store_url, session_dir, model_repository) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    home = session_dir / "packed-home"
    with import_services(
        "generator", triton_server.grpc_url, store_url, home, model_repository
    ) as endpoints:
        yield endpoints


@pytest.fixture()
def client(services: dict[str, str]) -> Iterator[clinisynth.Client]:
    with clinisynth.Client(endpoints=services, timeout=300) as c:
        yield c


def stubs(triton_server: Any, repo: pathlib.Path, triton_model: str) -> int:
    """Triton's python-backend processes serving ``triton_model`` (by their model.py path)."""
    marker = f"{repo}/{triton_model}/"
    return sum(
        1
        for cmd in hostload.process_tree(triton_server.pid).values()
        if "triton_python_backend_stub" in cmd and marker in cmd
    )


def poll(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    """``check()`` until truthy: an unload finishes in Triton after the call returns."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return result


def same_pixels(a: Any, b: Any) -> None:
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images, strict=True):
        if x.format == "raw":
            assert (
                np.ascontiguousarray(x.array).tobytes() == np.ascontiguousarray(y.array).tobytes()
            )
        else:
            assert _png_pixel_chunks(x.data) == _png_pixel_chunks(y.data)


def test_packed_sd_model_gives_split_pixels_in_one_process_per_instance_and_unloads(  # type: ignore[no-untyped-def]
    client, folders, triton_server, triton_client, model_repository
):
    # The same settings, instances included (torch's threads per process follow from them).
    split = client.import_model(folders["sd"], name="pk-sd-split", instances=2, max_batch_size=4)
    packed = client.import_model(
        folders["sd"], name="pk-sd-packed", layout="packed", instances=2, max_batch_size=4
    )
    assert (split.layout, packed.layout) == ("split", "packed")
    assert client.get_model("pk-sd-packed").layout == "packed"  # what `models show` prints
    assert {c.role for c in packed.components} == ROLES
    assert {c.triton_model for c in packed.components} == {
        f"pk-sd-packed.packed/{r}" for r in ROLES
    }
    assert all(c.ready for c in packed.components)

    for fmt in ("raw", "png"):
        kwargs = {"prompt": "small left pleural effusion", "seed": 3, "steps": 3, "format": fmt}
        a = client.generate(f"pk-sd-split@{split.version}", n=2, **kwargs)
        b = client.generate(f"pk-sd-packed@{packed.version}", n=2, **kwargs)
        same_pixels(a, b)
        assert a.images[0].provenance["replay"] == b.images[0].provenance["replay"]

    # In a crowd: concurrent requests reach the one process at different components (text
    # encoder, denoiser steps, VAE) and Triton may hand them to it together; the target's
    # pixels stay those it gets alone.
    target = {"prompt": "small left pleural effusion", "seed": 3, "steps": 3, "n": 2}
    ref = f"pk-sd-packed@{packed.version}"
    alone = client.generate(ref, format="raw", **target)
    with ThreadPoolExecutor(4) as pool:
        others = [
            pool.submit(client.generate, ref, prompt=p, seed=s, steps=3, format="raw")
            for p, s in (("cardiomegaly", 11), ("normal chest x-ray", 12), ("effusion", 13))
        ]
        crowded = pool.submit(client.generate, ref, format="raw", **target)
        for other in others:
            other.result()
    same_pixels(alone, crowded.result())

    # A component's config, as the services read it (the generator's replay mode): its own
    # parameters, as its split model's config states them.
    own = triton_client.model_config("pk-sd-packed.packed/vae_decode")["parameters"]
    split_own = triton_client.model_config("pk-sd-split.vae_decode")["parameters"]
    for key in ("torch_dtype", "batch_invariant"):
        assert own[key] == split_own[key], key
    assert not any("__" in key for key in own), sorted(own)
    # A bad tensor sent to a packed component is named as the caller named it.
    with pytest.raises(InvalidArgument) as info:
        triton_client.infer(
            "pk-sd-packed.packed/vae_decode",
            {"latents": np.zeros((1, 3, 8, 8), np.float32)},  # 4 latent channels expected
            ["image"],
        )
    assert [v.field for v in info.value.violations] == ["inputs.latents"], info.value.violations

    # One process per instance for the whole packed model; per component and instance split.
    assert stubs(triton_server, model_repository, "pk-sd-packed.packed") == 2
    assert sum(stubs(triton_server, model_repository, f"pk-sd-split.{r}") for r in ROLES) == 6

    gone = client.delete_model(f"pk-sd-packed@{packed.version}")
    assert gone.retired and not any(c.ready for c in gone.components)
    poll(
        lambda: stubs(triton_server, model_repository, "pk-sd-packed.packed") == 0,
        "the packed model's processes exit",
    )
    assert not (model_repository / "pk-sd-packed.packed").exists()
    # The split model is untouched and still serves.
    client.generate(f"pk-sd-split@{split.version}", prompt="x", seed=1, steps=1)
    client.delete_model(f"pk-sd-split@{split.version}")


def test_packed_ddpm_model_gives_split_pixels_and_a_second_version_replaces_the_first(  # type: ignore[no-untyped-def]
    client, folders, triton_server, model_repository
):
    split = client.import_model(folders["ddpm"], name="pk-ddpm-split")
    packed = client.import_model(folders["ddpm"], name="pk-ddpm-packed", layout="packed")
    assert [c.triton_model for c in packed.components] == ["pk-ddpm-packed.packed/denoiser"]
    kwargs = {"class_name": "b", "seed": 2, "steps": 4, "n": 3, "format": "raw"}
    same_pixels(
        client.generate(f"pk-ddpm-split@{split.version}", **kwargs),
        client.generate(f"pk-ddpm-packed@{packed.version}", **kwargs),
    )

    second = client.import_model(folders["ddpm"], name="pk-ddpm-packed", layout="packed")
    assert int(second.version) == int(packed.version) + 1
    client.delete_model(f"pk-ddpm-packed@{packed.version}")
    repo = model_repository / "pk-ddpm-packed.packed"
    assert sorted(p.name for p in repo.iterdir() if p.name.isdigit()) == [second.version]
    assert not (repo / "denoiser" / packed.version).exists()  # its weights went with it
    same_pixels(
        client.generate(f"pk-ddpm-split@{split.version}", **kwargs),
        client.generate(f"pk-ddpm-packed@{second.version}", **kwargs),
    )
    client.delete_model(f"pk-ddpm-packed@{second.version}")
    poll(
        lambda: stubs(triton_server, model_repository, "pk-ddpm-packed.packed") == 0,
        "the packed model's processes exit",
    )
    client.delete_model(f"pk-ddpm-split@{split.version}")


@pytest.fixture(scope="module")
def reward_services(  # type: ignore[no-untyped-def]
    triton_server, store_url, session_dir, model_repository
) -> Iterator[dict[str, str]]:
    home = session_dir / "packed-reward-home"
    with import_services(
        "reward", triton_server.grpc_url, store_url, home, model_repository
    ) as endpoints:
        yield endpoints


def test_a_packed_reward_model_scores_as_its_split_twin(reward_services, session_dir) -> None:  # type: ignore[no-untyped-def]
    import torch

    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.reward.scoring import write_reward_folder

    torch.manual_seed(0)
    folder = write_reward_folder(
        RewardModel(RewardModelConfig(num_classes=2, in_channels=1, backbone_width=4)),
        session_dir / "packed-folders" / "reward",
        classes=["benign", "malignant"],
        width=16,
    )
    images = [np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16) ** k for k in (1, 2, 3)]
    with clinisynth.Client(endpoints=reward_services, timeout=300) as client:
        refs = {}
        for layout in ("split", "packed"):
            details = client.import_model(folder, name=f"pk-reward-{layout}", layout=layout)
            assert details.layout == layout and all(c.ready for c in details.components)
            refs[layout] = details.ref
        (address,) = (c.triton_model for c in client.get_model(refs["packed"]).components)
        assert address.startswith("pk-reward-packed.packed/")

        def scores(ref: str) -> list[float]:
            got = poll(lambda: _try_score(client, images, ref), f"the reward service serves {ref}")
            return [s.p_aligned for s in got]

        assert scores(refs["packed"]) == scores(refs["split"])  # exact: same forward
        for ref in refs.values():
            client.delete_model(ref)


def _try_score(client: clinisynth.Client, images: list[np.ndarray], ref: str) -> Any:
    try:
        return client.score(images, class_name="malignant", model=ref)
    except clinisynth.InvalidArgumentError:  # the catalog cache has not seen it yet (~2 s)
        return None


def test_cli_imports_packed_and_models_show_prints_the_layout(services, folders) -> None:  # type: ignore[no-untyped-def]
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

    done = cli("models", "import", str(folders["ddpm"]), "--name", "pk-cli", "--layout", "packed",
               "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["layout"] == "packed"
    assert [c["triton_model"] for c in shown["components"]] == ["pk-cli.packed/denoiser"]
    text = cli("models", "show", "pk-cli")
    assert text.returncode == 0 and "layout: packed" in text.stdout, text.stdout
    assert "pk-cli.packed/denoiser" in text.stdout
    bad = cli("models", "import", str(folders["ddpm"]), "--name", "x", "--layout", "bundled")
    assert bad.returncode == 2 and "--layout" in bad.stderr
    assert cli("models", "delete", f"pk-cli@{shown['model']['version']}").returncode == 0


def test_bad_layouts_are_invalid_argument_by_field(client, folders):  # type: ignore[no-untyped-def]
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.import_model(folders["ddpm"], name="pk-bad", layout="bundled")
    assert "layout" in info.value.fields
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.import_model(
            folders["sd"], name="pk-mixed", layout="packed", component_devices={"vae": "gpu"}
        )
    assert "layout" in info.value.fields, info.value.fields
