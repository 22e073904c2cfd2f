"""Training state is safetensors + JSON, checkpoints are checksummed, and the worker refuses
anything that does not verify (a replaced, altered or added file, the old pickled format)."""

from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import threading
from typing import Any

import numpy as np
import pytest
import torch

from clinisynth_server.errors import FailedPrecondition
from clinisynth_server.finetune.kinds.base import (
    EMA,
    EpochSampler,
    load_rng_state,
    make_optimizer,
    rng_state,
    seed_everything,
)
from clinisynth_server.methods._checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    StateFormatError,
    load_state,
    save_checkpoint,
    save_state,
)

P = {
    "learning_rate": 1e-2,
    "lr_schedule": "cosine",
    "lr_warmup_steps": 2,
    "max_steps": 20,
    "keep_checkpoints": 5,
}


def code_running_pickle(marker: pathlib.Path) -> bytes:
    """A pickle that creates ``marker`` when unpickled (what a replaced trainer.pt could do)."""

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    return pickle.dumps({"trainer": Payload()})


class ToyTrainer:
    """The Trainer protocol on a model with BatchNorm (module metadata), AdamW, LR, EMA, RNG."""

    best_metric = ""
    best_mode = "max"

    def __init__(self, seed: int = 0) -> None:
        seed_everything(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)
        )
        self.optimizer, self.lr = make_optimizer(self.model.parameters(), P)
        self.ema = EMA(self.model, 0.9)
        self.sampler = EpochSampler(64, 8, seed)
        self.gen = torch.Generator().manual_seed(seed + 1)
        g = torch.Generator().manual_seed(99)
        self.data = torch.randn(64, 4, generator=g)

    def step(self, step: int) -> dict[str, float]:
        x = self.data[self.sampler.next()]
        x = x + 0.1 * torch.randn(x.shape, generator=self.gen) + 0.01 * torch.randn(x.shape)
        loss = self.model(x).pow(2).mean() + 1e-3 * float(np.random.rand())
        loss.backward()
        self.optimizer.step()
        self.lr.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return {"loss": float(loss.detach())}

    def evaluate(self) -> dict[str, float]:
        return {}

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr.state_dict(),
            "ema": self.ema.state_dict(),
            "sampler": self.sampler.state(),
            "gen": self.gen.get_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])
        self.ema.load_state_dict(state["ema"])
        self.sampler.load_state(state["sampler"])
        self.gen.set_state(state["gen"])

    def save_model(self, folder: pathlib.Path) -> None:
        save_checkpoint(folder, "toy", {}, self.ema.shadow)


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a.cpu(), b), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def test_state_round_trips_every_type_exactly(tmp_path: pathlib.Path) -> None:
    trainer = ToyTrainer()
    for s in range(1, 6):
        trainer.step(s)
    state = {
        "trainer": trainer.state(),
        "rng": rng_state(),
        "step": 5,
        "odd": {0: (1, 2.5), "f": float("inf"), "none": None, (1, "a"): [True]},
    }
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STATE_TENSORS, STATE_JSON])
    assert_same(state, load_state(tmp_path))


def test_resumed_training_continues_exactly_as_uninterrupted(tmp_path: pathlib.Path) -> None:
    torch.set_num_threads(1)  # one thread: the same float operations in the same order
    straight = ToyTrainer()
    first = [straight.step(s)["loss"] for s in range(1, 11)]

    half = ToyTrainer()
    for s in range(1, 6):
        half.step(s)
    save_state(tmp_path, {"trainer": half.state(), "rng": rng_state(), "step": 5})
    seed_everything(1234)  # the resuming process starts from other RNG state ...
    resumed = ToyTrainer()  # ... and a freshly built trainer
    state = load_state(tmp_path)
    resumed.load_state(state["trainer"])
    load_rng_state(state["rng"])
    after = [resumed.step(s)["loss"] for s in range(6, 11)]
    # Bit-identical: same inputs, optimiser moments, LR step, RNG and data position.
    assert after == first[5:]
    for a, b in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_non_data_values_are_refused_at_save(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TypeError, match=r"state\.trainer\.fn"):
        save_state(tmp_path, {"trainer": {"fn": print}})
    with pytest.raises(TypeError, match="dtype object"):
        save_state(tmp_path, {"a": np.array([object()])})


def test_pickle_in_place_of_state_files_never_runs(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "ran"
    bomb = code_running_pickle(marker)
    probe = tmp_path / "probe"
    pickle.loads(code_running_pickle(probe))
    assert probe.exists()  # the payload is live: unpickling it does run code
    for name in (STATE_TENSORS, STATE_JSON):
        folder = tmp_path / name
        save_state(folder, {"trainer": {"w": torch.ones(2)}, "rng": {}, "step": 1})
        (folder / name).write_bytes(bomb)
        with pytest.raises(StateFormatError):
            load_state(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "tree",
    [
        {"__tensor__": "t99"},
        {"__ndarray__": {"dtype": "object", "shape": [1], "data": [1]}},
        {"__items__": [[{"__tensor__": "t0"}, 1]]},
        {"__tuple__": "x"},
    ],
)
def test_malformed_json_state_is_refused(tmp_path: pathlib.Path, tree: dict[str, Any]) -> None:
    save_state(tmp_path, {"trainer": {"w": torch.ones(2)}})
    meta = json.loads((tmp_path / STATE_JSON).read_text())
    meta["state"] = {"trainer": tree}
    (tmp_path / STATE_JSON).write_text(json.dumps(meta))
    with pytest.raises(StateFormatError):
        load_state(tmp_path)


# -- the worker: write, verify, refuse, fall back ----------------------------------------------


@pytest.fixture()
def worker(tmp_path: pathlib.Path) -> Any:
    from clinisynth_server.finetune.records import JobRecord, JobStore
    from clinisynth_server.finetune.worker import Worker
    from clinisynth_server.store import open_store

    url = str(tmp_path / "store")
    JobStore(open_store(url)).put(
        JobRecord(
            id="ft-test", kind="toy", dataset="data/x", params={}, model_name="toy", state="running"
        )
    )
    w = Worker("ft-test", store_url=url, workdir=tmp_path / "work", model_repository="")
    threading.Thread(target=w._writer, daemon=True).start()
    return w


def write_checkpoints(worker: Any, steps: list[int]) -> ToyTrainer:
    from clinisynth_server.finetune.records import CheckpointInfo, JobStore

    trainer = ToyTrainer()
    for s in range(1, max(steps) + 1):
        trainer.step(s)
        if s in steps:
            worker._checkpoint(trainer, s, {"loss": 1.0}, CheckpointInfo, JobStore, rng_state, P)
    worker._drain()
    return trainer


def refusals(worker: Any) -> list[str]:
    worker._drain()
    return [
        e.message
        for e in worker.jobs.events(worker.run_id)
        if e.type == "error" and "refused" in e.message
    ]


def test_worker_resumes_from_a_verified_checkpoint(worker: Any) -> None:
    trainer = write_checkpoints(worker, [3, 6])
    manifest = worker.store.get_json(
        worker.jobs.checkpoint_prefix(worker.run_id, "000000006") + "checkpoint.json"
    )
    assert {
        "state/trainer.safetensors",
        "state/trainer.json",
        "model/model.safetensors",
        "model/config.json",
    } == set(manifest["files"])
    ckpt, state = worker._newest_verified(worker.jobs.checkpoints(worker.run_id))
    assert ckpt.step == 6 and state["step"] == 6
    assert_same(trainer.state(), state["trainer"])
    assert refusals(worker) == []


@pytest.mark.parametrize(
    "attack", ["flip_byte", "pickle_added", "pickle_replaces", "consistent_manifest", "model_file"]
)
def test_worker_refuses_a_tampered_checkpoint_and_falls_back(
    worker: Any, tmp_path: pathlib.Path, attack: str
) -> None:
    write_checkpoints(worker, [3, 6])
    store, prefix = worker.store, worker.jobs.checkpoint_prefix(worker.run_id, "000000006")
    marker = tmp_path / "ran"
    if attack == "flip_byte":  # still a parseable safetensors file: only the digest tells
        data = bytearray(store.get_bytes(prefix + "state/trainer.safetensors"))
        data[-1] ^= 0x01
        store.put_bytes(prefix + "state/trainer.safetensors", bytes(data))
    elif attack == "pickle_added":  # the old name, as the previous worker would have read it
        store.put_bytes(prefix + "state/trainer.pt", code_running_pickle(marker))
    elif attack == "pickle_replaces":
        store.put_bytes(prefix + "state/trainer.safetensors", code_running_pickle(marker))
    elif attack == "model_file":
        store.put_bytes(prefix + "model/model.safetensors", b"not the weights")
    else:  # new state and a manifest that matches it: only the recorded digest tells
        local = tmp_path / "evil"
        save_state(local, {"trainer": {"model": {}}, "rng": rng_state(), "step": 6})
        manifest = store.get_json(prefix + "checkpoint.json")
        for name in ("trainer.safetensors", "trainer.json"):
            store.put_file(prefix + f"state/{name}", local / name)
            manifest["files"][f"state/{name}"] = hashlib.sha256(
                (local / name).read_bytes()
            ).hexdigest()
        store.put_json(prefix + "checkpoint.json", manifest)
    ckpt, state = worker._newest_verified(worker.jobs.checkpoints(worker.run_id))
    assert ckpt.step == 3 and state["step"] == 3
    assert not marker.exists()
    messages = refusals(worker)
    assert len(messages) == 1 and "checkpoint 000000006 refused" in messages[0], messages


def test_worker_refuses_the_old_pickled_format_and_starts_over_without_a_good_one(
    worker: Any, tmp_path: pathlib.Path
) -> None:
    from clinisynth_server.finetune.records import CheckpointInfo

    marker = tmp_path / "ran"
    prefix = worker.jobs.checkpoint_prefix(worker.run_id, "000000004")
    worker.store.put_bytes(prefix + "state/trainer.pt", code_running_pickle(marker))
    info = CheckpointInfo(
        id="000000004", step=4, metrics={}, created=0.0, best=False, prefix=prefix
    )
    worker.store.put_json(prefix + "checkpoint.json", info.to_json())  # the previous layout
    assert worker._newest_verified(worker.jobs.checkpoints(worker.run_id)) is None
    assert not marker.exists()
    messages = refusals(worker)
    assert len(messages) == 2 and "older format" in messages[0], messages
    assert "starting over from step 0" in messages[1], messages


# -- the service records each checkpoint's digests; resume and promotion trust only those -------


JOB = "ft-svc"


@pytest.fixture()
def service(tmp_path: pathlib.Path) -> Any:
    """A finetune service (no scheduler thread, no Triton) owning one running job's record."""
    from clinisynth_server.catalog import Catalog
    from clinisynth_server.finetune.records import JobRecord
    from clinisynth_server.finetune.service import FinetuneService, Settings
    from clinisynth_server.store import open_store

    store = open_store(str(tmp_path / "store"))
    (tmp_path / "repo").mkdir()
    svc = FinetuneService(
        store,
        Catalog(store, ttl_s=0.0),
        None,
        None,
        Settings(model_repository=str(tmp_path / "repo")),
    )
    record = JobRecord(
        id=JOB,
        kind="diffusion_pretrain",
        dataset="data/x",
        params={},
        model_name="toy",
        state="running",
        checkpoints={},
    )
    svc.jobs.put(record)
    svc._records[JOB] = record
    return svc


def job_worker(service: Any, tmp_path: pathlib.Path) -> Any:
    """A worker process's view of the job: it reads job.json as the service last wrote it."""
    from clinisynth_server.finetune.worker import Worker

    w = Worker(
        JOB, store_url=str(tmp_path / "store"), workdir=tmp_path / "work", model_repository=""
    )
    threading.Thread(target=w._writer, daemon=True).start()
    return w


def sync(service: Any) -> Any:
    with service._lock:
        service._record_checkpoints(service._records[JOB])
    return service.jobs.get(JOB)  # as persisted


def tamper_consistently(store: Any, prefix: str, rel: str, data: bytes) -> str:
    """Replace ``rel`` and rewrite the manifest to match: only a recorded digest tells."""
    store.put_bytes(prefix + rel, data)
    manifest = store.get_json(prefix + "checkpoint.json")
    manifest["files"][rel] = hashlib.sha256(data).hexdigest()
    raw = json.dumps(manifest).encode()
    store.put_bytes(prefix + "checkpoint.json", raw)
    return hashlib.sha256(raw).hexdigest()


def forge_report(service: Any, ckpt_id: str, digest: str) -> None:
    """What a process that can write the job's files can also do: append a checkpoint event."""
    service.jobs.append_event(
        JOB,
        "checkpoint",
        step=int(ckpt_id),
        checkpoint={"id": ckpt_id, "step": int(ckpt_id), "manifest_sha256": digest},
    )


def test_service_records_each_reported_checkpoint_in_the_job_record(
    service: Any, tmp_path: pathlib.Path
) -> None:
    w = job_worker(service, tmp_path)
    write_checkpoints(w, [3, 6])
    persisted = sync(service)
    assert set(persisted.checkpoints) == {"000000003", "000000006"}
    for ckpt_id, digest in persisted.checkpoints.items():
        prefix = service.jobs.checkpoint_prefix(JOB, ckpt_id)
        raw = service.store.get_bytes(prefix + "checkpoint.json")
        assert digest == hashlib.sha256(raw).hexdigest()
        assert persisted.checkpoint_files[ckpt_id] == json.loads(raw)["files"]
        assert persisted.checkpoint_attempts[ckpt_id] == 0


def test_resume_trusts_the_service_record_not_the_workers_events(
    service: Any, tmp_path: pathlib.Path
) -> None:
    w = job_worker(service, tmp_path)
    write_checkpoints(w, [3, 6])
    recorded = dict(sync(service).checkpoints)
    prefix = service.jobs.checkpoint_prefix(JOB, "000000006")
    local = tmp_path / "evil"
    save_state(local, {"trainer": {"model": {}}, "rng": rng_state(), "step": 6})
    tamper_consistently(
        service.store, prefix, "state/trainer.json", (local / STATE_JSON).read_bytes()
    )
    forged = tamper_consistently(
        service.store, prefix, "state/trainer.safetensors", (local / STATE_TENSORS).read_bytes()
    )
    forge_report(service, "000000006", forged)
    # The same attempt reporting a checkpoint again with another digest changes nothing.
    assert sync(service).checkpoints == recorded
    resumed = job_worker(service, tmp_path)  # relaunched after a crash
    result = resumed._newest_verified(resumed.jobs.checkpoints(JOB))
    assert result is not None and result[0].step == 3 and result[1]["step"] == 3
    messages = refusals(resumed)
    assert len(messages) == 1 and "checkpoint 000000006 refused" in messages[0], messages
    assert "recorded when it was written" in messages[0]


def test_resume_refuses_a_checkpoint_the_service_never_recorded(
    service: Any, tmp_path: pathlib.Path
) -> None:
    w = job_worker(service, tmp_path)
    write_checkpoints(w, [3])
    sync(service)
    # A checkpoint that appears without the service having taken its report (planted, or
    # reported only after the worker died) is never loaded.
    write_checkpoints(w, [6])
    resumed = job_worker(service, tmp_path)
    result = resumed._newest_verified(resumed.jobs.checkpoints(JOB))
    assert result is not None and result[0].step == 3
    messages = refusals(resumed)
    assert len(messages) == 1 and "never recorded" in messages[0], messages


def test_a_later_attempt_may_rewrite_a_checkpoint(service: Any, tmp_path: pathlib.Path) -> None:
    w = job_worker(service, tmp_path)
    write_checkpoints(w, [3])
    first = sync(service).checkpoints["000000003"]
    record = service._records[JOB]
    record.attempt = 1  # the worker died; its successor writes step 3 again
    write_checkpoints(job_worker(service, tmp_path), [3])
    second = sync(service).checkpoints["000000003"]
    raw = service.store.get_bytes(
        service.jobs.checkpoint_prefix(JOB, "000000003") + "checkpoint.json"
    )
    assert second != first and second == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("attack", ["rewritten_file", "added_file", "manifest_only"])
def test_promotion_refuses_a_checkpoint_changed_after_it_was_recorded(
    service: Any, tmp_path: pathlib.Path, attack: str
) -> None:
    w = job_worker(service, tmp_path)
    write_checkpoints(w, [3])
    sync(service)
    prefix = service.jobs.checkpoint_prefix(JOB, "000000003")
    if attack == "rewritten_file":
        data = bytearray(service.store.get_bytes(prefix + "model/model.safetensors"))
        data[-1] ^= 0x01  # still loadable weights: only the digests tell
        tamper_consistently(service.store, prefix, "model/model.safetensors", bytes(data))
        named = "model/model.safetensors"
    elif attack == "added_file":
        tamper_consistently(service.store, prefix, "model/model.py", b"import os\n")
        named = "model/model.py"
    else:
        manifest = service.store.get_json(prefix + "checkpoint.json")
        manifest["metrics"] = {"loss": 0.0}
        service.store.put_json(prefix + "checkpoint.json", manifest)
        named = "checkpoint.json"
    with pytest.raises(FailedPrecondition, match="nothing was registered") as err:
        service.promote(JOB, "000000003")
    assert err.value.metadata["file"] == named, err.value.message
    assert named in err.value.message
    assert service.catalog.versions("toy") == []
    assert list((tmp_path / "repo").iterdir()) == []


def test_records_without_digests_still_load_and_are_filled_in_once(
    service: Any, tmp_path: pathlib.Path
) -> None:
    w = job_worker(service, tmp_path)
    write_checkpoints(w, [3])
    key = service.jobs.key(JOB, "job.json")
    old = service.store.get_json(key)
    for name in ("checkpoints", "checkpoint_files", "checkpoint_attempts", "checkpoint_events"):
        old.pop(name)
    old["state"] = "succeeded"
    service.store.put_json(key, old)  # a record written before digests were kept
    legacy = service.jobs.get(JOB)
    assert legacy.checkpoints is None
    service._records[JOB] = legacy
    filled = sync(service)
    raw = service.store.get_bytes(
        service.jobs.checkpoint_prefix(JOB, "000000003") + "checkpoint.json"
    )
    assert filled.checkpoints == {"000000003": hashlib.sha256(raw).hexdigest()}
