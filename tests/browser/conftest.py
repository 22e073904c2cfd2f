"""A reward service on a fresh store (no Triton needed: no reward model → FIFO queue) and a real
headless Chromium (Debian's ``chromium`` + ``chromium-driver``; skipped when missing)."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

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
