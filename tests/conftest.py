"""Shared fixtures: one real Triton for the session, tiny models registered into it, and the
services started in-process on port 0 against that Triton and a store in a temp folder."""

from __future__ import annotations

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
    from clinisynth_server import builders, registry

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
