"""Shared fixtures: one real Triton for the session, tiny models registered into it, and the
services started in-process on port 0 against that Triton and a store in a temp folder."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:  # two cores shared with Triton's stubs: one torch thread in the test process
    import torch

    torch.set_num_threads(1)
except ImportError:  # the SDK-only tests run without torch
    pass

CELL_CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("clinisynth")


@pytest.fixture(scope="session")
def model_repository(session_dir: pathlib.Path) -> pathlib.Path:
    repo = session_dir / "triton-models"
    repo.mkdir()
    return repo


@pytest.fixture(scope="session")
def triton_server(model_repository: pathlib.Path, session_dir: pathlib.Path) -> Iterator[object]:
    from clinisynth_server.triton.launcher import TritonServer

    server = TritonServer(model_repository, log_path=session_dir / "tritonserver.log", strict=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def triton_client(triton_server: object) -> Iterator[object]:
    from clinisynth_server.triton.client import TritonClient

    client = TritonClient(triton_server.grpc_url, timeout_s=120)  # type: ignore[attr-defined]
    yield client
    client.close()


@pytest.fixture(scope="session")
def store_url(session_dir: pathlib.Path) -> str:
    return str(session_dir / "store")


@pytest.fixture(scope="session")
def store(store_url: str) -> object:
    from clinisynth_server.store import open_store

    return open_store(store_url)


@pytest.fixture(scope="session")
def catalog(store: object) -> object:
    from clinisynth_server.catalog import Catalog

    return Catalog(store, ttl_s=0.0)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def registered_models(
    session_dir: pathlib.Path,
    catalog: object,
    store: object,
    model_repository: pathlib.Path,
    triton_client: object,
) -> dict[str, object]:
    """Tiny class-conditional, unconditional and text-to-image models, registered in Triton."""
    from clinisynth_lab import builders
    from clinisynth_server import registry

    folders = {
        "cells-tiny": builders.build_pixel_unet(
            session_dir / "m" / "cells", classes=CELL_CLASSES, size=16, labels={"domain": "cells"}
        ),
        "fundus-tiny": builders.build_pixel_unet(
            session_dir / "m" / "fundus", size=16, channels=3, labels={"domain": "fundus"}
        ),
        "chest-tiny": builders.build_text_to_image(
            session_dir / "m" / "chest", size=32, image_channels=1, labels={"domain": "chest"}
        ),
    }
    return {
        name: registry.register_folder(
            folder,
            name,
            catalog=catalog,
            store=store,  # type: ignore[arg-type]
            model_repository=model_repository,
            triton=triton_client,
        )  # type: ignore[arg-type]
        for name, folder in folders.items()
    }


def start_service(name: str, triton_url: str, store_url: str, home: pathlib.Path, **extra: str):
    """Start one service in-process on a free port; returns the RunningServer."""
    import importlib

    from clinisynth_server.runtime.config import load_config
    from clinisynth_server.runtime.server import start_server

    env = {
        "CLINISYNTH_TRITON_URL": triton_url,
        "CLINISYNTH_STORE_URL": store_url,
        f"CLINISYNTH_{name.upper()}_CACHE_DIR": str(home / "cache"),
    }
    env.update({f"CLINISYNTH_{name.upper()}_{k.upper()}": v for k, v in extra.items()})
    config = load_config(name, env=env, port=0, metrics_port=0)
    app = importlib.import_module(f"clinisynth_server.{name}.app")
    return start_server(config, app.create(config))


@pytest.fixture(scope="session")
def generator_server(triton_server, store_url, session_dir, registered_models):  # type: ignore[no-untyped-def]
    running = start_service("generator", triton_server.grpc_url, store_url, session_dir)
    yield running
    running.stop(0)


@pytest.fixture()
def sdk_client(generator_server):  # type: ignore[no-untyped-def]
    import clinisynth

    with clinisynth.Client(endpoints={"generator": generator_server.address}, timeout=120) as c:
        yield c


@contextlib.contextmanager
def import_services(
    serving: str, triton_url: str, store_url: str, home: pathlib.Path, model_repository: Any
) -> Iterator[dict[str, str]]:
    """A finetune service that imports models into ``model_repository`` and the ``serving``
    service (generator or reward) that serves them: their endpoints, stopped on exit."""
    finetune = start_service(
        "finetune",
        triton_url,
        store_url,
        home,
        model_repository=str(model_repository),
        workdir=str(home / "work"),
    )
    other = start_service(serving, triton_url, store_url, home)
    try:
        yield {"finetune": finetune.address, serving: other.address}
    finally:
        other.stop(0)
        finetune.stop(0)


# --- models several modules share: built, registered and loaded once per session ---
OBVIOUS = ("oversized", "border_crop", "missing_nucleus", "split_membrane", "extra_nucleus")


def phantom_set(n: int, seed: int) -> tuple[Any, Any, Any]:
    """Half real cell phantoms (plausible), half corrupted ones the oracle rejects: images in
    [0, 1], class labels, and the oracle's plausibility."""
    import numpy as np

    from clinisynth_lab.phantoms import cells

    images, labels = cells.generate(n, seed=seed)
    rng = np.random.default_rng(seed)
    out, aligned = [], []
    for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
        if i % 2 == 0:
            out.append(im)
        else:
            out.append(cells.corrupt(im, OBVIOUS[(i // 2) % len(OBVIOUS)], rng))
        aligned.append(cells.oracle(out[-1], int(lab)).plausible)
    return np.stack(out).astype(np.float32) / 255.0, labels, np.array(aligned)


@pytest.fixture(scope="session")
def reward_model(session_dir, catalog, store, model_repository, triton_client):  # type: ignore[no-untyped-def]
    """``cells-reward``, trained on cell phantoms labelled by the oracle: (model, record).

    Session-scoped: the reward, read-namespace and other modules score with the same record
    (each module used to train and register its own version)."""
    import torch

    from clinisynth_server import registry
    from clinisynth_server.methods.reward_model import (
        RewardModel,
        RewardModelConfig,
        train_reward_model,
    )
    from clinisynth_server.reward.scoring import write_reward_folder

    torch.manual_seed(0)
    x, y, a = phantom_set(240, seed=1)
    model = RewardModel(RewardModelConfig(num_classes=4, in_channels=1, backbone_width=8))
    train_reward_model(
        model,
        torch.from_numpy(x)[:, None],
        torch.from_numpy(y),
        torch.from_numpy(a),
        epochs=10,
        lr=1e-2,
        batch_size=32,
        weight_decay=0.0,
    )
    folder = write_reward_folder(
        model,
        session_dir / "m" / "cells-reward",
        classes=CELL_CLASSES,
        width=32,
        labels={"domain": "cells"},
    )
    record = registry.register_folder(
        folder,
        "cells-reward",
        catalog=catalog,
        store=store,
        model_repository=model_repository,
        triton=triton_client,
        max_batch_size=64,
    )
    return model, record


@pytest.fixture(scope="session")
def cf_models(session_dir, catalog, store, model_repository, triton_client):  # type: ignore[no-untyped-def]
    """The counterfactual toy models (``counterfactual.toy``): a denoiser, a plain and a
    PGD-robust classifier, trained, registered, and their guidance model loaded in Triton.

    Session-scoped: four modules guide with them (each used to train and load its own)."""
    import concurrent.futures

    import torch

    from clinisynth_lab.toy import build_toy_models
    from clinisynth_server import registry
    from clinisynth_server.counterfactual import guidance

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folders = build_toy_models(session_dir / "cf-toy")
    finally:
        torch.set_num_threads(threads)
    common = {"catalog": catalog, "store": store, "model_repository": model_repository}
    # The denoiser is used only inside its guidance model, so it is registered without a load.
    records = {
        "denoiser": registry.register_folder(folders.denoiser, "blob-denoiser", **common),
        "robust": registry.register_folder(folders.robust, "blob-robust", **common),
        "plain": registry.register_folder(folders.plain, "blob-plain", **common),
    }
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three loads side by side
        jobs = [
            pool.submit(triton_client.load_model, records[k].components["classifier"])
            for k in ("robust", "plain")
        ]
        jobs.append(
            pool.submit(
                guidance.ensure_guidance_model,
                records["denoiser"],
                records["robust"],
                records["plain"],
                model_repository=model_repository,
                triton=triton_client,
                store=store,
                parameters={"torch_threads": "1"},  # 2 shared cores: no contention
            )
        )
        records["guidance"] = [j.result() for j in jobs][-1]
    return records


# --- the review page: a reward service on a fresh store and a real headless Chromium ---
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


@pytest.fixture()
def start_reward(tmp_path: pathlib.Path) -> Iterator[Callable[..., tuple[Any, str]]]:
    """``start_reward(**env)`` → (RunningServer, review page URL); stopped after the test."""
    from clinisynth_server.reward import app
    from clinisynth_server.runtime.config import load_config
    from clinisynth_server.runtime.server import start_server

    started: list[Any] = []

    def start(**extra: str) -> tuple[Any, str]:
        env = {
            "CLINISYNTH_TRITON_URL": "127.0.0.1:1",
            "CLINISYNTH_STORE_URL": str(tmp_path / f"s{len(started)}"),
            "CLINISYNTH_REWARD_HTTP_PORT": "0",
        }
        env.update({f"CLINISYNTH_REWARD_{k.upper()}": v for k, v in extra.items()})
        config = load_config("reward", env=env, port=0, metrics_port=0)
        register = app.create(config)
        running = start_server(config, register)
        started.append(running)
        return running, register.app.web.url  # type: ignore[attr-defined]

    yield start
    for running in started:
        running.stop(0)


@pytest.fixture()
def reward_app(start_reward: Callable[..., tuple[Any, str]]) -> tuple[Any, str]:
    """A reward service without bearer tokens."""
    return start_reward()


@pytest.fixture()
def browser(tmp_path: pathlib.Path) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (pathlib.Path(CHROMIUM).exists() and pathlib.Path(DRIVER).exists()):
        pytest.skip("Debian's chromium + chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()
