"""Reward service through the running stack: SDK / CLI → gRPC → reward service → real Triton
(role reward_scorer) and the real artifact store. The reward model is trained here on cell
phantoms labelled by the phantom oracle (real = plausible, corrupted = implausible)."""

from __future__ import annotations

import csv
import io
import json
import pathlib
import urllib.request

import numpy as np
import pytest
from PIL import Image

import clinisynth
from clinisynth.cli import main as cli_main
from tests.conftest import phantom_set

pytestmark = pytest.mark.stack

CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# reward_model (cells-reward, trained on oracle-labelled phantoms) is session-scoped in
# tests/conftest.py, shared with the read-namespace tests.


@pytest.fixture(scope="module")
def reward_server(triton_server, store_url, session_dir, reward_model):
    from tests.conftest import start_service

    running = start_service("reward", triton_server.grpc_url, store_url, session_dir, http_port="0")
    yield running
    running.stop(0)


@pytest.fixture()
def client(reward_server):
    with clinisynth.Client(endpoints={"reward": reward_server.address}, timeout=120) as c:
        yield c


def test_trained_reward_model_scores_held_out_images_better_than_chance(client, reward_model):
    x, y, a = phantom_set(96, seed=99)
    scores = []
    for cls in range(4):
        idx = np.flatnonzero(y == cls)
        got = client.score(x[idx], CLASSES[cls], model="cells-reward")
        scores += [(s.p_aligned, bool(a[i])) for s, i in zip(got, idx, strict=True)]
        assert all(s.model_version == f"cells-reward@{reward_model[1].version}" for s in got)
        assert all(s.reward == s.p_aligned and 0 < s.reward < 1 for s in got)
    p = np.array([s for s, _ in scores])
    truth = np.array([t for _, t in scores])
    auc = float((p[truth][:, None] > p[~truth][None, :]).mean())
    assert auc > 0.65, auc  # chance = 0.5
    # Served scores equal the in-process model's (same weights, same preprocessing).
    import torch

    with torch.no_grad():
        local = (
            reward_model[0]
            .reward(torch.from_numpy(x[:8])[:, None], torch.from_numpy(y[:8]))
            .numpy()
        )
    served = [
        client.score(x[i], CLASSES[int(y[i])], model="cells-reward")[0].p_aligned for i in range(8)
    ]
    np.testing.assert_allclose(served, local, atol=1e-5)


def test_score_stream_from_client_images_and_store_prefix(client, store):
    x, y, _ = phantom_set(20, seed=5)
    progress = []
    stream = client.score_stream(
        ((f"img{i}", x[i], CLASSES[int(y[i])]) for i in range(20)),
        model="cells-reward",
        batch_size=8,
        progress=progress.append,
    )
    results = list(stream)
    assert [r.name for r in results] == [f"img{i}" for i in range(20)]
    assert stream.summary is not None and stream.summary.scored == 20
    assert abs(stream.summary.mean_reward - np.mean([r.reward for r in results])) < 1e-5
    assert [p.step for p in progress] == [8, 16, 20]
    # A store prefix in ImageFolder layout: sub-folder = class.
    for i in range(6):
        store.put_bytes(f"datasets/score-me/{CLASSES[int(y[i])]}/{i}.png", png(x[i]))
    progress.clear()
    stream = client.score_stream(
        store_prefix="datasets/score-me", model="cells-reward", progress=progress.append
    )
    by_name = {r.name: r for r in stream}
    assert len(by_name) == 6 and progress[-1].total_steps == 6
    direct = client.score(x[0], CLASSES[int(y[0])], model="cells-reward")[0]
    key = f"datasets/score-me/{CLASSES[int(y[0])]}/0.png"
    assert abs(by_name[key].reward - direct.reward) < 2 / 255 + 1e-3  # PNG quantisation


def test_cli_score_writes_csv_with_progress(client, reward_server, tmp_path, monkeypatch, capsys):
    x, y, _ = phantom_set(10, seed=7)
    for i in range(10):
        d = tmp_path / "imgs" / CLASSES[int(y[i])]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(png(x[i]))
    monkeypatch.setenv("CLINISYNTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLINISYNTH_REWARD_ADDRESS", reward_server.address)
    out = tmp_path / "scores.csv"
    assert (
        cli_main(["score", str(tmp_path / "imgs"), "--model", "cells-reward", "--out", str(out)])
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10 and set(rows[0]) == {"path", "reward", "p_aligned", "model_version"}
    assert all(r["model_version"].startswith("cells-reward@") for r in rows)
    assert "10/10" in capsys.readouterr().err  # the tqdm bar
    # --class overrides the sub-folders.
    assert (
        cli_main(
            [
                "score",
                str(tmp_path / "imgs" / CLASSES[int(y[0])]),
                "--model",
                "cells-reward",
                "--class",
                CLASSES[int(y[0])],
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert len(list(csv.DictReader(out.open()))) >= 1


def test_score_arrays_is_what_reward_filtered_generation_calls(
    reward_server, catalog, triton_client, reward_model
):
    from clinisynth_server.reward.scoring import Condition, resolve_model, score_arrays

    x, _y, _ = phantom_set(4, seed=11)
    small = x[:, ::2, ::2]  # 16x16, as the tiny generator makes: resized to the model
    p = score_arrays(catalog, triton_client, small, CLASSES[0])  # default model for the class
    assert p.shape == (4,) and np.all((p > 0) & (p < 1))
    # The default is the catalog's default reward model for the class (other modules of the
    # session may have registered a newer one than cells-reward): the same scores by name.
    default = resolve_model(catalog, "", "", Condition(class_name=CLASSES[0]), field="model")
    p2 = score_arrays(
        catalog,
        triton_client,
        small,
        CLASSES[0],
        model=default.name,
        version=str(default.version),
    )
    np.testing.assert_allclose(p, p2, atol=1e-6)
    p3 = score_arrays(
        catalog,
        triton_client,
        small,
        CLASSES[0],
        model="cells-reward",
        version=str(reward_model[1].version),
    )
    assert p3.shape == (4,) and np.all((p3 > 0) & (p3 < 1))


def test_feedback_is_idempotent_durable_listable_and_exportable(
    client, store, tmp_path, reward_server, monkeypatch
):
    x, _y, _ = phantom_set(4, seed=13)
    first = client.feedback.submit(
        png(x[0]),
        rater_id="dr_idem",
        plausible=True,
        class_name="neutrophil",
        client_request_id="req-1",
        criteria={"nucleus_count": True, "membrane_smooth": False},
        comment="fine",
        time_spent_ms=1200,
        generator="cells-tiny@1",
    )
    again = client.feedback.submit(
        png(x[0]),
        rater_id="dr_idem",
        plausible=False,
        class_name="neutrophil",
        client_request_id="req-1",
    )
    assert not first.duplicate and again.duplicate and again.id == first.id
    assert again.plausible is True  # the stored record, not the retry's body
    # Durable before the reply: the record and the image are in the store.
    stored = store.get_json(f"feedback/records/{first.id}.json")
    assert stored["criteria"] == {"nucleus_count": True, "membrane_smooth": False}
    assert store.exists(first.image_key) and first.image_key.endswith(first.image_sha256 + ".png")
    for i in range(1, 4):
        client.feedback.submit(
            x[i], rater_id="dr_idem", plausible=bool(i % 2), class_name="monocyte"
        )
    mine = client.feedback.list(rater_id="dr_idem", page_size=2)  # several pages
    assert next(f.client_request_id for f in mine) == "req-1" and len(mine) == 4
    assert [f.id for f in client.feedback.list(rater_id="dr_idem", class_name="monocyte")] == [
        f.id for f in mine[1:]
    ]
    res = client.feedback.export(out=tmp_path / "export", class_name="monocyte")
    assert res.judgements >= 3 and res.prefix.startswith("exports/feedback/")
    rows = [json.loads(line) for line in (tmp_path / "export" / "labels.jsonl").open()]
    ours = [r for r in rows if r["rater_id"] == "dr_idem"]
    assert len(ours) == 3
    assert set(ours[0]) >= {
        "image",
        "condition",
        "plausible",
        "rater_id",
        "criteria",
        "feedback_id",
        "generator",
    }
    assert all((tmp_path / "export" / r["image"]).is_file() for r in rows)
    assert ours[0]["condition"] == {"class_name": "monocyte"}
    # CLI: list --json and export --out.
    monkeypatch.setenv("CLINISYNTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLINISYNTH_REWARD_ADDRESS", reward_server.address)
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    assert cli_main(["feedback", "list", "--rater", "dr_idem", "--json"]) == 0
    assert len(json.loads(buf.getvalue())) == 4
    assert cli_main(["feedback", "export", "--out", str(tmp_path / "cli-export")]) == 0
    assert (tmp_path / "cli-export" / "labels.jsonl").is_file()


def test_review_queue_active_selection_and_several_raters(client):
    x, _y, _a = phantom_set(12, seed=17)
    items = client.review.enqueue(
        x[:12], class_name="eosinophil", raters_per_item=2, generator="cells-tiny@1"
    )
    assert len(items) == 12 and all(it.p_aligned is not None for it in items)
    again = client.review.enqueue(x[:1], class_name="eosinophil", raters_per_item=2)
    assert again[0].id == items[0].id  # same image, same condition → same item
    batch = client.review.next("dr_q1", class_name="eosinophil", limit=12)
    ours = [it for it in batch.items if it.id in {i.id for i in items}]
    dist = [abs(it.p_aligned - 0.5) for it in ours]
    assert dist == sorted(dist)  # least certain first
    first = ours[0]
    for rater in ("dr_q1", "dr_q2"):
        client.feedback.submit(rater_id=rater, item_id=first.id, plausible=True)
    after = client.review.next("dr_q1", class_name="eosinophil", limit=50)
    assert first.id not in {it.id for it in after.items}  # judged by this rater
    third = client.review.next("dr_q3", class_name="eosinophil", limit=50)
    assert first.id not in {it.id for it in third.items}  # already has 2 raters
    second = ours[1]
    client.feedback.submit(rater_id="dr_q1", item_id=second.id, plausible=False)
    third = client.review.next("dr_q3", class_name="eosinophil", limit=50)
    assert second.id in {it.id for it in third.items}  # 1 of 2 judgements so far
    assert third.pending == batch.pending - 1


def test_agreement_cohen_for_two_raters_fleiss_for_more(client):
    x, _, _ = phantom_set(10, seed=23)
    items = client.review.enqueue(x, class_name="lymphocyte", raters_per_item=3)
    a = [True, True, False, False, True, False, True, True, False, False]
    b = [True, False, False, False, True, False, True, True, True, False]
    for it, va, vb in zip(items, a, b, strict=True):
        client.feedback.submit(rater_id="dr_ag1", item_id=it.id, plausible=va, time_spent_ms=900)
        client.feedback.submit(rater_id="dr_ag2", item_id=it.id, plausible=vb, time_spent_ms=1100)
    report = client.agreement(class_name="lymphocyte")
    (cond,) = report.conditions
    assert cond.statistic == "cohen" and cond.raters == 2 and cond.shared_items == 10
    # p_o = 0.8, p_e = 0.5·0.5 + 0.5·0.5 = 0.5 → κ = 0.6
    assert cond.kappa == pytest.approx(0.6) and cond.percent_agreement == pytest.approx(0.8)
    for it in items[:5]:
        client.feedback.submit(rater_id="dr_ag3", item_id=it.id, plausible=True)
    cond = client.agreement(class_name="lymphocyte").conditions[0]
    assert cond.statistic == "fleiss" and cond.raters == 3
    stats = {r.rater_id: r for r in client.agreement().raters}
    assert stats["dr_ag1"].judgements == 10 and stats["dr_ag1"].median_time_spent_ms == 900


def test_checklist_for_cells_and_default(client):
    cl = client.checklist(class_name="monocyte")
    assert "nucleus_shape" in [c.name for c in cl] and "kidney" in cl[-2].description
    assert next(c.name for c in client.checklist(prompt="small left pleural effusion")) == (
        "anatomy_plausible"
    )


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("unknown_ref", "images[0].ref.key"),
        ("unknown_class", "condition.class_name"),
        ("non_image", "images[0].encoded"),
        ("oversized", "images[0].encoded"),
        ("wrong_size", "images[0]"),
        ("feedback_unknown_item", "feedback.item_id"),
        ("feedback_unknown_class", "feedback.condition.class_name"),
        ("feedback_bad_criterion", "feedback.criteria[0].criterion"),
        ("feedback_no_rater", "feedback.rater_id"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(client, call, field):
    from clinisynth.v1 import common_pb2

    x, _, _ = phantom_set(2, seed=3)
    calls = {
        "unknown_ref": lambda: client.score(
            [common_pb2.Image(ref=common_pb2.ArtifactRef(key="no/such.png"))],
            "neutrophil",
            model="cells-reward",
        ),
        "unknown_class": lambda: client.score(x[0], "megakaryocyte", model="cells-reward"),
        "non_image": lambda: client.score([b"hello, not an image"], "neutrophil"),
        "oversized": lambda: client.score([b"\x89PNG\r\n\x1a\n" + bytes(5 * 2**20)], "neutrophil"),
        "wrong_size": lambda: client.score(x[0][:24, :24], "neutrophil"),
        "feedback_unknown_item": lambda: client.feedback.submit(
            rater_id="dr_x", item_id="ri-nope", plausible=True
        ),
        "feedback_unknown_class": lambda: client.feedback.submit(
            x[0], rater_id="dr_x", class_name="megakaryocyte", plausible=True
        ),
        "feedback_bad_criterion": lambda: client.feedback.submit(
            x[0],
            rater_id="dr_x",
            class_name="neutrophil",
            plausible=True,
            criteria={"looks_cool": True},
        ),
        "feedback_no_rater": lambda: client.feedback.submit(
            x[0], rater_id="", class_name="neutrophil", plausible=True
        ),
    }
    with pytest.raises(clinisynth.InvalidArgumentError) as info:
        calls[call]()
    assert field in info.value.fields, info.value.fields


def test_label_out_of_range_is_invalid_argument_in_triton(triton_client, reward_model):
    from clinisynth_server.errors import InvalidArgument

    record = reward_model[1]
    with pytest.raises(InvalidArgument) as info:
        triton_client.infer(
            record.components["scorer"],
            {"image": np.zeros((1, 1, 32, 32), np.float32), "class_label": np.array([7], np.int64)},
            ["p_aligned"],
            version=str(record.version),
        )
    assert "class_label" in str(info.value)


def test_unknown_rater_when_raters_are_registered(
    triton_server, store_url, session_dir, reward_model
):
    from tests.conftest import start_service

    running = start_service(
        "reward", triton_server.grpc_url, store_url, session_dir, http_port="0", raters="dr_a,dr_b"
    )
    try:
        with clinisynth.Client(endpoints={"reward": running.address}) as c:
            ok = c.feedback.submit(
                np.zeros((8, 8), np.float32),
                rater_id="dr_a",
                class_name="neutrophil",
                plausible=False,
            )
            assert ok.rater_id == "dr_a"
            with pytest.raises(clinisynth.InvalidArgumentError) as info:
                c.feedback.submit(
                    np.zeros((8, 8), np.float32),
                    rater_id="mallory",
                    class_name="neutrophil",
                    plausible=False,
                )
            assert info.value.fields == ["feedback.rater_id"]
    finally:
        running.stop(0)


def test_quality_metrics_are_exported(client, reward_server):
    x, _y, _ = phantom_set(4, seed=29)
    client.score(x, "neutrophil", model="cells-reward", generator="cells-tiny@3")
    client.agreement()
    url = f"http://127.0.0.1:{reward_server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert (
        'clinisynth_reward_score_bucket{condition="neutrophil",generator_model="cells-tiny",'
        'generator_version="3"' in text
    )
    assert "clinisynth_reward_images_scored_total{" in text
    assert 'clinisynth_reward_feedback_total{condition="neutrophil",label="plausible"}' in text
    assert "clinisynth_reward_feedback_pending{" in text
    assert 'clinisynth_reward_rater_agreement_kappa{condition="lymphocyte"}' in text


def test_async_client_twins(reward_server):
    import asyncio

    x, _, _ = phantom_set(3, seed=31)

    async def run() -> None:
        async with clinisynth.AsyncClient(endpoints={"reward": reward_server.address}) as c:
            scores = await c.score(x, "neutrophil", model="cells-reward")
            assert len(scores) == 3
            streamed = [s async for s in c.score_stream(x, "neutrophil", model="cells-reward")]
            assert [s.reward for s in streamed] == pytest.approx([s.reward for s in scores])
            fb = await c.feedback.submit(
                x[0], rater_id="dr_async", class_name="neutrophil", plausible=True
            )
            assert [f.id for f in await c.feedback.list(rater_id="dr_async")] == [fb.id]
            items = await c.review.enqueue(x[1:], class_name="neutrophil")
            batch = await c.review.next("dr_async", class_name="neutrophil", limit=100)
            assert {i.id for i in items} <= {i.id for i in batch.items}
            assert (await c.agreement()).raters

    asyncio.run(run())


def test_review_page_is_served_and_reported(reward_server):
    # start_service prints "REVIEW <url>"; the page answers on it.
    import importlib.resources

    from clinisynth_server.reward import app  # noqa: F401 - the page ships with the package

    files = importlib.resources.files("clinisynth_server.reward")
    html, script = (files / "review.html").read_text(), (files / "review.js").read_text()
    assert 'src="/review.js"' in html and "keydown" in script and "/api/feedback" in script


def test_write_reward_folder_text_conditioned(tmp_path):
    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.reward.scoring import write_reward_folder

    model = RewardModel(
        RewardModelConfig(conditioning="text", text_dim=64, in_channels=1, backbone_width=4)
    )
    folder = write_reward_folder(model, tmp_path / "r", width=32)
    meta = json.loads((folder / "clinisynth.json").read_text())
    assert meta["kind"] == "reward" and meta["triton_role"] == "reward_scorer"
    assert meta["extra"]["conditioning"] == "text" and meta["extra"]["text_dim"] == 64
    assert pathlib.Path(folder / "model.safetensors").is_file()
