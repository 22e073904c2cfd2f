"""The asyncio client closes the gaps it used to have, against small real in-process gRPC servers.

Each server answers like the real service's wire contract (scores, stream events, upload refs)
without Triton; the point is the SDK side: progress on ``score`` / ``upload_dataset`` /
``generate``, ``score_stream().summary``, ``score_folder`` and ``counterfactual_stream`` on
``AsyncClient``, and the same results from both twins.
"""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

import clinisynth
from clinisynth.v1 import (
    common_pb2,
    counterfactual_pb2,
    counterfactual_pb2_grpc,
    finetune_pb2,
    finetune_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

MODEL = common_pb2.ModelRef(name="cells-reward", version="2")


def _reward_of(image: common_pb2.Image) -> float:
    """A deterministic stand-in score derived from the bytes sent (so order errors show)."""
    payload = image.SerializeToString()
    return int(hashlib.sha256(payload).hexdigest()[:4], 16) / 0xFFFF


class Reward(reward_pb2_grpc.RewardServiceServicer):
    def Score(self, request: Any, context: grpc.ServicerContext) -> Any:
        scores = [
            reward_pb2.ImageScore(
                index=i, reward=_reward_of(im), p_aligned=_reward_of(im), model=MODEL
            )
            for i, im in enumerate(request.images)
        ]
        return reward_pb2.ScoreResponse(scores=scores)

    def ScoreStream(self, requests: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        rewards = []
        for n, req in enumerate(requests):
            if req.WhichOneof("item") != "image":
                continue
            r = _reward_of(req.image.image)
            rewards.append(r)
            score = reward_pb2.ImageScore(
                index=n - 1, reward=r, p_aligned=r, model=MODEL, name=req.image.name
            )
            yield reward_pb2.ScoreStreamEvent(score=score)
            yield reward_pb2.ScoreStreamEvent(progress=common_pb2.Progress(stage="score", step=n))
        done = reward_pb2.ScoreSummary(
            scored=len(rewards), mean_reward=float(np.mean(rewards)), model=MODEL
        )
        yield reward_pb2.ScoreStreamEvent(done=done)


class Finetune(finetune_pb2_grpc.FinetuneServiceServicer):
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def UploadDatasetFile(self, chunks: Any, context: grpc.ServicerContext) -> Any:
        key, data = "", b""
        for chunk in chunks:
            key = key or chunk.key
            data += chunk.data
        self.files[key] = data
        return common_pb2.ArtifactRef(key=key, sha256=hashlib.sha256(data).hexdigest())

    def ValidateDataset(self, request: Any, context: grpc.ServicerContext) -> Any:
        names = [k for k in self.files if k.startswith(request.prefix + "/")]
        return finetune_pb2.DatasetReport(
            prefix=request.prefix, layout=request.layout, images=len(names)
        )


class Counterfactual(counterfactual_pb2_grpc.CounterfactualServiceServicer):
    def CounterfactualStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        for step in (1, 2):
            point = counterfactual_pb2.TrajectoryPoint(step=step, p_target_robust=0.4 * step)
            yield counterfactual_pb2.CounterfactualEvent(point=point)
        done = counterfactual_pb2.CounterfactualResponse(target_class=request.target_class)
        yield counterfactual_pb2.CounterfactualEvent(done=done)


class Generator(generator_pb2_grpc.GeneratorServiceServicer):
    def GenerateStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        total = request.steps
        for step in range(1, total + 1):
            progress = common_pb2.Progress(stage="denoise", step=step, total_steps=total)
            yield generator_pb2.GenerateEvent(progress=progress)
        yield generator_pb2.GenerateEvent(done=generator_pb2.GenerateResponse(request_id="g1"))


@pytest.fixture(scope="module")
def endpoints() -> Iterator[dict[str, str]]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(Reward(), srv)
    finetune_pb2_grpc.add_FinetuneServiceServicer_to_server(Finetune(), srv)
    counterfactual_pb2_grpc.add_CounterfactualServiceServicer_to_server(Counterfactual(), srv)
    generator_pb2_grpc.add_GeneratorServiceServicer_to_server(Generator(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    address = f"127.0.0.1:{port}"
    try:
        yield {s: address for s in ("reward", "finetune", "counterfactual", "generator")}
    finally:
        srv.stop(None)


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(5).random((n, 8, 8), dtype=np.float32)


def test_async_score_reports_progress_and_matches_sync(endpoints: dict[str, str]) -> None:
    images = _images(70)  # two chunks of at most 64
    seen: list[clinisynth.ProgressEvent] = []

    async def run() -> list[clinisynth.ImageScore]:
        async with clinisynth.AsyncClient(endpoints=endpoints) as client:
            return await client.score(images, "neutrophil", progress=seen.append)

    got = asyncio.run(run())
    with clinisynth.Client(endpoints=endpoints) as client:
        want = client.score(images, "neutrophil")
    assert [s.reward for s in got] == [s.reward for s in want]
    assert [(e.step, e.total_steps) for e in seen] == [(64, 70), (70, 70)]


def test_async_score_stream_keeps_the_summary(endpoints: dict[str, str]) -> None:
    images = _images(5)

    async def run() -> tuple[list[float], clinisynth.ScoreSummary | None]:
        async with clinisynth.AsyncClient(endpoints=endpoints) as client:
            stream = client.score_stream(images, "neutrophil")
            rewards = [s.reward async for s in stream]
            return rewards, stream.summary

    rewards, summary = asyncio.run(run())
    assert summary is not None
    assert summary.scored == len(rewards) == 5
    assert summary.mean_reward == pytest.approx(float(np.mean(rewards)), abs=1e-6)
    assert summary.model_version == "cells-reward@2"


def test_async_score_folder_names_each_file(
    endpoints: dict[str, str], tmp_path: pathlib.Path
) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("L", (8, 8), 40 if cls == "a" else 200).save(tmp_path / cls / "x.png")

    async def run() -> list[clinisynth.ImageScore]:
        async with clinisynth.AsyncClient(endpoints=endpoints) as client:
            return await client.score_folder(tmp_path, progress=False)

    got = asyncio.run(run())
    with clinisynth.Client(endpoints=endpoints) as client:
        want = client.score_folder(tmp_path, progress=False)
    assert [s.name for s in got] == ["a/x.png", "b/x.png"] == [s.name for s in want]
    assert [s.reward for s in got] == [s.reward for s in want]


def test_async_upload_dataset_reports_progress(
    endpoints: dict[str, str], tmp_path: pathlib.Path
) -> None:
    for i, cls in enumerate(("neutrophil", "neutrophil", "lymphocyte")):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.new("L", (8, 8), 30 * i).save(tmp_path / cls / f"{i}.png")
    seen: list[clinisynth.ProgressEvent] = []

    async def run() -> clinisynth.DatasetReport:
        async with clinisynth.AsyncClient(endpoints=endpoints) as client:
            return await client.finetune.upload_dataset(
                tmp_path, "datasets/twins", progress=seen.append
            )

    report = asyncio.run(run())
    assert report.images == 3
    assert [(e.step, e.total_steps) for e in seen] == [(1, 3), (2, 3), (3, 3)]
    assert sorted(e.message for e in seen) == [
        "lymphocyte/2.png",
        "neutrophil/0.png",
        "neutrophil/1.png",
    ]


def test_async_counterfactual_stream_and_generate_progress(endpoints: dict[str, str]) -> None:
    seen: list[clinisynth.ProgressEvent] = []

    async def run() -> tuple[list[str], str]:
        async with clinisynth.AsyncClient(endpoints=endpoints) as client:
            kinds = [
                e.WhichOneof("event")
                async for e in client.counterfactual_stream(_images(1)[0], target="referable")
            ]
            result = await client.generate("cells", steps=3, seed=1, progress=seen.append)
            return kinds, result.request_id

    kinds, request_id = asyncio.run(run())
    assert kinds == ["point", "point", "done"]
    assert request_id == "g1"
    assert [e.step for e in seen] == [1, 2, 3]
