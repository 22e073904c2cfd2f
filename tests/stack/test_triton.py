"""Stack tests for the Triton runtime layer: the real ``tritonserver`` from nvidia-pytriton.

One server (module fixture) serves tiny diffusers / transformers models built from configs;
every check goes through :class:`TritonClient` and compares with the in-process forward.
A second, one-model server (the shipped ``deploy/triton`` sample) is stopped on purpose.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from stack_helpers import group_members

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from clinisynth_server.errors import (  # noqa: E402
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from clinisynth_server.triton import repository  # noqa: E402
from clinisynth_server.triton.backends import denoiser as denoiser_role  # noqa: E402
from clinisynth_server.triton.client import TritonClient  # noqa: E402
from clinisynth_server.triton.launcher import TritonServer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_REPO = REPO_ROOT / "deploy" / "triton" / "models"
SAMPLE = "sample_denoiser"  # the shipped class-conditional UNet2DModel, seeded from config

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]


# -- tiny models ------------------------------------------------------------------------------
# Every model is one python stub importing torch + diffusers (~7 s of CPU each), so the
# class-conditional UNet2DModel under test is the shipped sample itself (seeded from its
# config.json); its version 2 is a saved checkpoint of the same config.
SAMPLE_WEIGHTS = SAMPLE_REPO / SAMPLE / "1" / "weights"


def _sample_unet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = diffusers.UNet2DModel
    return cls.from_config(cls.load_config(str(SAMPLE_WEIGHTS))).eval()


def _unet_cond() -> torch.nn.Module:
    torch.manual_seed(1)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=4,
    ).eval()


def _text_encoder() -> torch.nn.Module:
    torch.manual_seed(2)
    config = transformers.CLIPTextConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=12,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return transformers.CLIPTextModel(config).eval()


def _vae() -> torch.nn.Module:
    torch.manual_seed(3)
    return diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        scaling_factor=0.5,
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Tiny models saved diffusers/transformers-style: name → (in-process model, folder)."""
    root = tmp_path_factory.mktemp("weights")
    built = {
        "sample_v2": _sample_unet(7),
        "unet_cond": _unet_cond(),
        "text": _text_encoder(),
        "vae": _vae(),
    }
    out = {}
    for name, model in built.items():
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    out[SAMPLE] = (_sample_unet(0), SAMPLE_WEIGHTS)  # what Triton builds from the config
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, models: dict) -> Path:
    path = tmp_path_factory.mktemp("model_repository")
    w = {name: folder for name, (_, folder) in models.items()}
    shutil.copytree(SAMPLE_REPO / SAMPLE, path / SAMPLE)  # as shipped
    repository.write_model(path, "unet_cond", "denoiser", w["unet_cond"])
    repository.write_model(path, "text", "text_encoder", w["text"])
    repository.write_model(path, "vae_dec", "vae_decode", w["vae"])
    repository.write_model(path, "vae_enc", "vae_encode", w["vae"])
    return path


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[TritonServer]:
    with TritonServer(repo) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: TritonServer) -> Iterator[TritonClient]:
    with TritonClient(server.grpc_url, timeout_s=60.0, retries=1) as c:
        yield c


def _close(a: np.ndarray, b: torch.Tensor | np.ndarray) -> None:
    expected = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    np.testing.assert_allclose(a, expected, rtol=1e-4, atol=1e-5)


# -- repository builder (no server) --------------------------------------------------------------
def test_versions_and_roles(tmp_path: Path, models: dict) -> None:
    folder = models[SAMPLE][1]
    assert repository.write_model(tmp_path, "m", "denoiser", folder) == 1
    assert repository.add_version(tmp_path, "m", folder) == 2
    assert repository.list_versions(tmp_path, "m") == [1, 2]
    assert repository.list_models(tmp_path) == ["m"]
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".staging")]
    with pytest.raises(NotFound):
        repository.write_model(tmp_path, "x", "no_such_role", folder)
    with pytest.raises(NotFound):
        repository.add_version(tmp_path, "absent", folder)
    with pytest.raises(InvalidArgument):
        repository.write_model(tmp_path, "bad name", "denoiser", folder)


def test_register_role_from_another_module(tmp_path: Path, models: dict) -> None:
    repository.register_role("denoiser_alias", "clinisynth_server.triton.backends.denoiser")
    repository.write_model(tmp_path, "m", "denoiser_alias", models[SAMPLE][1])
    assert repository.read_role(tmp_path / "m" / "config.pbtxt") == "denoiser_alias"
    assert "backends.denoiser" in (tmp_path / "m" / "1" / "model.py").read_text()


def test_shipped_sample_matches_builder_output() -> None:
    model_py = (SAMPLE_REPO / SAMPLE / "1" / "model.py").read_text()
    assert model_py == repository.model_py("denoiser", "clinisynth_server.triton.backends.denoiser")


# -- through the real server ----------------------------------------------------------------
def test_repository_index_lists_every_model_ready(client: TritonClient) -> None:
    entries = {(e.name, e.version): e.state for e in client.repository_index()}
    for name in (SAMPLE, "unet_cond", "text", "vae_dec", "vae_enc"):
        assert entries[(name, "1")] == "READY"
    assert client.is_ready() and client.model_ready(SAMPLE)
    assert client.model_config("unet_cond")["max_batch_size"] == 8


def test_class_conditional_unet_matches_in_process(client: TritonClient, models: dict) -> None:
    unet = models[SAMPLE][0]
    rng = np.random.default_rng(0)
    for size in (8, 32):  # variable H, W through the same model
        x = rng.standard_normal((2, 1, size, size)).astype(np.float32)
        t = np.array([3.0, 900.0], np.float32)
        labels = np.array([0, 1], np.int64)
        got = client.infer(
            SAMPLE, {"sample": x, "timestep": t, "class_labels": labels}, ["noise_pred"]
        )["noise_pred"]
        with torch.no_grad():
            want = unet(
                torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(labels)
            ).sample
        _close(got, want)


def test_text_conditioned_pipeline_pieces_match(client: TritonClient, models: dict) -> None:
    unet, text, vae = models["unet_cond"][0], models["text"][0], models["vae"][0]
    ids = np.array([[0, 5, 9, 1, 1, 1], [0, 7, 1, 1, 1, 1]], np.int64)
    enc = client.infer("text", {"input_ids": ids}, ["last_hidden_state", "pooler_output"])
    with torch.no_grad():
        want = text(input_ids=torch.from_numpy(ids))
    _close(enc["last_hidden_state"], want.last_hidden_state)
    _close(enc["pooler_output"], want.pooler_output)

    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10.0, 500.0], np.float32)
    eps = client.infer(
        "unet_cond",
        {"sample": latents, "timestep": t, "encoder_hidden_states": enc["last_hidden_state"]},
        ["noise_pred"],
    )["noise_pred"]
    with torch.no_grad():
        want_eps = unet(
            torch.from_numpy(latents),
            torch.from_numpy(t),
            encoder_hidden_states=want.last_hidden_state,
        ).sample
    _close(eps, want_eps)

    image = client.infer("vae_dec", {"latents": latents}, ["image"])["image"]
    with torch.no_grad():  # the VAE side divides by scaling_factor
        want_image = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample
    assert image.shape == (2, 1, 16, 16)
    _close(image, want_image)

    encoded = client.infer("vae_enc", {"image": image}, ["latents", "latents_std"])
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(image.copy())).latent_dist
    _close(encoded["latents"], dist.mean * vae.config.scaling_factor)
    _close(encoded["latents_std"], dist.std * vae.config.scaling_factor)


def test_same_backend_code_in_process_and_in_triton(client: TritonClient, models: dict) -> None:
    backend = denoiser_role.Backend(models[SAMPLE][1], {"random_init_seed": "0"}, "cpu")
    inputs = {
        "sample": np.random.default_rng(2).standard_normal((3, 1, 8, 8)).astype(np.float32),
        "timestep": np.array([1.0, 2.0, 3.0], np.float32),
        "class_labels": np.array([1, 1, 0], np.int64),
    }
    got = client.infer(SAMPLE, inputs, ["noise_pred"])["noise_pred"]
    _close(got, backend(inputs)["noise_pred"])


def test_concurrent_requests_are_dynamically_batched(client: TritonClient) -> None:
    before = client.statistics(SAMPLE, "1")[0]
    n_threads = 8
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    x = np.zeros((1, 1, 8, 8), np.float32)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            client.infer(
                SAMPLE,
                {
                    "sample": x + i,
                    "timestep": np.array([float(i)], np.float32),
                    "class_labels": np.array([i % 2]),
                },
                ["noise_pred"],
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    # Triton updates a model's statistics after the backend has sent its responses: a loaded
    # host can answer all eight calls before the last executions are counted, so wait for them.
    deadline = time.monotonic() + 30
    while True:
        after = client.statistics(SAMPLE, "1")[0]
        inferences = after.inference_count - before.inference_count
        if inferences >= n_threads or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    executions = after.execution_count - before.execution_count
    assert inferences == n_threads
    assert executions < inferences, after.batch_sizes


def test_errors_map_to_the_clinisynth_tree(client: TritonClient) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    ok = {"sample": x, "timestep": np.array([1.0], np.float32), "class_labels": np.array([0])}
    with pytest.raises(NotFound):
        client.infer("no_such_model", ok, ["noise_pred"])
    with pytest.raises(NotFound):
        client.infer(SAMPLE, ok, ["noise_pred"], version="99")
    with pytest.raises(NotFound):
        client.load_model("no_such_model")
    with pytest.raises(InvalidArgument) as bad_dtype:
        client.infer(SAMPLE, {**ok, "sample": x.astype(np.float64)}, ["noise_pred"])
    assert bad_dtype.value.violations[0].field == "inputs.sample"
    with pytest.raises(InvalidArgument):
        client.infer(SAMPLE, {**ok, "sample": np.zeros((1, 3, 8, 8), np.float32)}, ["noise_pred"])
    with pytest.raises(Internal):  # the UNet cannot upsample back to 7×7: a model error
        client.infer(SAMPLE, {**ok, "sample": np.zeros((1, 1, 7, 7), np.float32)}, ["noise_pred"])
    assert not client.model_ready("no_such_model")
    assert client.infer(SAMPLE, ok, ["noise_pred"])["noise_pred"].shape == (1, 1, 8, 8)


def test_new_version_serves_while_old_still_answers(
    client: TritonClient, repo: Path, models: dict
) -> None:
    v1_model, _ = models[SAMPLE]
    v2_model, v2_dir = models["sample_v2"]
    inputs = {
        "sample": np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32),
        "timestep": np.array([42.0], np.float32),
        "class_labels": np.array([1]),
    }
    torch_inputs = [torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timestep"])]
    with torch.no_grad():
        want_v1 = v1_model(*torch_inputs, class_labels=torch.tensor([1])).sample
        want_v2 = v2_model(*torch_inputs, class_labels=torch.tensor([1])).sample

    # clients pinned to version 1 keep being served while version 2 loads
    stop = threading.Event()
    served: list[np.ndarray] = []
    failures: list[BaseException] = []

    def pinned_traffic() -> None:
        while True:
            try:
                out = client.infer(SAMPLE, inputs, ["noise_pred"], version="1")
            except BaseException as exc:
                failures.append(exc)
                return
            served.append(out["noise_pred"])
            if stop.wait(0.1):  # paced: leave the CPUs to the loading stubs
                return

    traffic = threading.Thread(target=pinned_traffic)
    traffic.start()
    try:
        assert repository.add_version(repo, SAMPLE, v2_dir) == 2
        client.load_model(SAMPLE)
    finally:
        stop.set()
        traffic.join()
    assert not failures and served
    for out in served:
        _close(out, want_v1)
    assert client.model_ready(SAMPLE, "2") and client.model_ready(SAMPLE, "1")
    _close(client.infer(SAMPLE, inputs, ["noise_pred"], version="1")["noise_pred"], want_v1)
    _close(client.infer(SAMPLE, inputs, ["noise_pred"], version="2")["noise_pred"], want_v2)
    _close(client.infer(SAMPLE, inputs, ["noise_pred"])["noise_pred"], want_v2)  # latest


def test_unloaded_model_is_not_found(client: TritonClient) -> None:
    client.unload_model("vae_enc")  # its checks ran above
    assert not client.model_ready("vae_enc")
    with pytest.raises(NotFound):
        client.infer("vae_enc", {"image": np.zeros((1, 1, 8, 8), np.float32)}, ["latents"])
    assert "vae_enc" in {e.name for e in client.repository_index()}  # still in the repository


def test_start_failure_is_unavailable_with_log_tail(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text("this is { not a config")
    srv = TritonServer(tmp_path)
    with pytest.raises(Unavailable) as info:
        srv.start()
    assert "broken" in str(info.value)  # the log tail names the failing model
    assert srv.pid is None or group_members(srv.pid) == []


def test_missing_repository_is_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition):
        TritonServer(tmp_path / "absent").start()


def test_module_entry_runs_in_foreground_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "services"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clinisynth_server.triton.launcher",
            "--model-repository",
            str(tmp_path / "empty"),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "tritonserver ready" in line, line + proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_client_is_unavailable_when_nothing_listens() -> None:
    from clinisynth_server.triton.launcher import free_ports

    port = free_ports(1)[0]
    with TritonClient(f"127.0.0.1:{port}", timeout_s=5.0, retries=2, backoff_s=0.01) as c:
        with pytest.raises(Unavailable):
            c.repository_index()
        assert not c.is_ready()


# -- lifecycle: runs LAST (pytest keeps file order) because it stops the shared server ------
def test_zz_stop_leaves_no_process_and_clients_get_unavailable(server: TritonServer) -> None:
    pgid = server.pid
    assert pgid is not None
    assert len(group_members(pgid)) >= 2  # tritonserver + python stubs
    server.stop()
    assert group_members(pgid) == []
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
    with TritonClient(server.grpc_url, timeout_s=5.0, retries=1, backoff_s=0.01) as c:
        assert not c.is_ready()
        with pytest.raises(Unavailable):
            c.infer(SAMPLE, {"sample": np.zeros((1, 1, 8, 8), np.float32)}, ["noise_pred"])
