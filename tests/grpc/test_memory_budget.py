"""Pixel budgets through the running reward service: SDK → gRPC → reward service → real Triton.

Small uploads that declare huge images are refused from their headers (INVALID_ARGUMENT naming
the image and the budget) before a pixel is decoded; a request at the budget is scored; the
service stays SERVING. The service runs in this process, so its RSS is sampled here.
"""

from __future__ import annotations

import threading
import time

import pytest

import clinisynth
from clinisynth_lab.benchmarks import memory

pytestmark = pytest.mark.stack

SIDE = 4096
BUDGET = 4 * SIDE * SIDE  # the default per-request pixel budget
CLASSES = ["budget_a", "budget_b"]  # own classes: never the default model of another test


def png_bomb() -> bytes:
    return memory.png_bomb(SIDE)


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

    bomb = memory.deflated_dicom(512, 512, 536 * (1 << 20))  # ~0.5 MB that inflates to 536 MB
    with PeakRss() as rss, pytest.raises(clinisynth.InvalidArgumentError) as info:
        client.score([common_pb2.Image(dicom=bomb)], CLASSES[0], model="budget-reward", resize=True)
    assert "images[0].dicom" in info.value.fields, info.value.fields
    assert rss.growth < 64, f"RSS grew {rss.growth:.0f} MB refusing a deflated bomb"
    assert client.health()["reward"] == "SERVING"


# --- the review queue stays flat as a request grows (peak RSS of the service's own process) ---
#
# Measured on the reward service as its own process (``clinisynth-serve reward``, what
# ``clinisynth benchmark memory`` runs): before each request its peak RSS is reset
# (``/proc/<pid>/clear_refs`` 5 sets VmHWM to the current RSS) and VmHWM is read after, so a
# figure is that one request's peak and nothing of this test process (the SDK, the images) is in
# it. NextReviewItems scores what a service has not scored yet, so each of its measurements
# starts a fresh service. The bound: a request at the pixel budget (4 × 4096²) may peak at most
# 48 MB above a 1-image request, less than one more 4096² float32 image (64 MB) held at once;
# before, every decoded image was held until scoring (+3 × 64 MB and more).
FLAT_MB = 48


def _fresh_reward(triton_server, store_url, home):  # type: ignore[no-untyped-def]
    import os

    env = {
        **os.environ,
        "CLINISYNTH_TRITON_URL": triton_server.grpc_url,
        "CLINISYNTH_STORE_URL": store_url,
        "CLINISYNTH_REWARD_HTTP_PORT": "0",
        "CLINISYNTH_HOME": str(home),
    }
    key_file = getattr(triton_server, "key_file", None)
    if key_file:  # restricted Triton: the service reads the key from the file
        env["CLINISYNTH_TRITON_KEY_FILE"] = str(key_file)
    return memory.serve_process("reward", env, stderr=None)


def _peak(proc, fn) -> float:  # type: ignore[no-untyped-def]
    peak, status = memory._peak_mb(proc.pid, fn)
    assert status == "ok", status
    return peak


def _bombs(n: int, first: int) -> list[bytes]:
    return [memory.png_bomb(SIDE, value=first + i) for i in range(n)]  # distinct: n items


def test_enqueue_review_peak_rss_is_flat_up_to_the_pixel_budget(
    triton_server, store_url, tmp_path, budget_reward
):
    proc, address, _ = _fresh_reward(triton_server, store_url, tmp_path)
    try:
        with clinisynth.Client(endpoints={"reward": address}, timeout=300) as c:
            c.review.enqueue([memory.png_bomb(32, 1)], class_name=CLASSES[0])  # warm-up
            one = _peak(proc, lambda: c.review.enqueue(_bombs(1, 10), class_name=CLASSES[0]))
            four = _peak(proc, lambda: c.review.enqueue(_bombs(4, 20), class_name=CLASSES[0]))
            with pytest.raises(clinisynth.InvalidArgumentError):  # 5 × 4096² is over the budget
                c.review.enqueue(_bombs(5, 30), class_name=CLASSES[0])
            assert c.health()["reward"] == "SERVING"
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"EnqueueReview peak RSS: 1 × 4096² {one:.0f} MB, 4 × 4096² {four:.0f} MB")
    assert four - one < FLAT_MB, f"1 image: {one:.0f} MB, 4 images: {four:.0f} MB"


def test_next_review_items_scores_pending_items_with_flat_peak_rss(
    triton_server, store_url, tmp_path, budget_reward
):
    cls = CLASSES[1]

    def next_peak(home) -> float:  # type: ignore[no-untyped-def]
        proc, address, _ = _fresh_reward(triton_server, store_url, home)
        try:
            with clinisynth.Client(endpoints={"reward": address}, timeout=300) as c:
                c.review.next("warm-up", class_name=CLASSES[0], limit=1)  # warm-up, other class
                return _peak(proc, lambda: c.review.next("rater-1", class_name=cls, limit=10))
        finally:
            proc.terminate()
            proc.wait(30)

    proc, address, _ = _fresh_reward(triton_server, store_url, tmp_path / "a")
    try:
        with clinisynth.Client(endpoints={"reward": address}, timeout=300) as c:
            c.review.enqueue(_bombs(1, 40), class_name=cls)
    finally:
        proc.terminate()
        proc.wait(30)
    one = next_peak(tmp_path / "b")  # a fresh service scores the pending 4096² item
    proc, address, _ = _fresh_reward(triton_server, store_url, tmp_path / "c")
    try:
        with clinisynth.Client(endpoints={"reward": address}, timeout=300) as c:
            c.review.enqueue(_bombs(3, 50), class_name=cls)
    finally:
        proc.terminate()
        proc.wait(30)
    four = next_peak(tmp_path / "d")  # and then four of them
    print(f"NextReviewItems peak RSS: 1 pending {one:.0f} MB, 4 pending {four:.0f} MB")
    assert four - one < FLAT_MB, f"1 pending: {one:.0f} MB, 4 pending: {four:.0f} MB"
