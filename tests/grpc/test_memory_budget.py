"""Pixel budgets through the running reward service: SDK → gRPC → reward service → real Triton.

Small uploads that declare huge images are refused from their headers (INVALID_ARGUMENT naming
the image and the budget) before a pixel is decoded; a request at the budget is scored; the
service stays SERVING. The service runs in this process, so its RSS is sampled here.
"""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

import clinisynth

pytestmark = pytest.mark.stack

SIDE = 4096
BUDGET = 4 * SIDE * SIDE  # the default per-request pixel budget
CLASSES = ["budget_a", "budget_b"]  # own classes: never the default model of another test


def png_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (SIDE, SIDE), 7).save(buf, format="PNG")
    return buf.getvalue()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Samples this process's RSS every 5 ms while the block runs."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.base


@pytest.fixture(scope="module")
def budget_reward(session_dir, catalog, store, model_repository, triton_client):
    import torch

    from clinisynth_server import registry
    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.reward.scoring import write_reward_folder

    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(num_classes=2, in_channels=1, backbone_width=8))
    folder = write_reward_folder(
        model, session_dir / "m" / "budget-reward", classes=CLASSES, width=32
    )
    return registry.register_folder(
        folder,
        "budget-reward",
        catalog=catalog,
        store=store,
        model_repository=model_repository,
        triton=triton_client,
        max_batch_size=16,
    )


@pytest.fixture(scope="module")
def reward_server(triton_server, store_url, session_dir, budget_reward):
    from tests.conftest import start_service

    running = start_service("reward", triton_server.grpc_url, store_url, session_dir, http_port="0")
    yield running
    running.stop(0)


@pytest.fixture()
def client(reward_server):
    with clinisynth.Client(endpoints={"reward": reward_server.address}, timeout=300) as c:
        yield c


def test_png_bombs_over_the_budget_are_refused_before_decoding(client):
    bomb = png_bomb()
    assert len(bomb) < 64 * 1024  # each decodes to 4096² (64 MB as float32)
    with PeakRss() as rss, pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.score([bomb] * 8, CLASSES[0], model="budget-reward", resize=True)
    assert "images[4].encoded" in info.value.fields, info.value.fields
    assert str(BUDGET) in str(info.value) and "budget" in str(info.value)
    # Refused from headers: not even one image (64 MB as float32) was decoded.
    assert rss.growth < 64, f"RSS grew {rss.growth:.0f} MB for a refused request"
    assert client.health()["reward"] == "SERVING"


def test_a_request_at_the_budget_is_scored_one_image_at_a_time(client):
    bomb = png_bomb()
    with PeakRss() as rss:
        scores = client.score([bomb] * 4, CLASSES[0], model="budget-reward", resize=True)
    assert len(scores) == 4
    # One image at a time: a decoded image (~16 MB in Pillow + 64 MB float32 + 64 MB for the
    # float resize) is live at once; four held together, as before, would add 3 x 64 MB more.
    assert rss.growth < 300, f"RSS grew {rss.growth:.0f} MB for 4 x 4096² at the budget"
    assert client.health()["reward"] == "SERVING"


def test_deflated_dicom_bomb_is_refused_with_bounded_memory(client):
    from clinisynth.v1 import common_pb2
    from tests.unit.test_decode_budget import deflated_dicom

    bomb = deflated_dicom(512, 512, 536 * (1 << 20))  # ~0.5 MB that inflates to 536 MB
    with PeakRss() as rss, pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.score([common_pb2.Image(dicom=bomb)], CLASSES[0], model="budget-reward", resize=True)
    assert "images[0].dicom" in info.value.fields, info.value.fields
    assert rss.growth < 64, f"RSS grew {rss.growth:.0f} MB refusing a deflated bomb"
    assert client.health()["reward"] == "SERVING"
