"""The one typed wrapper over ``tritonclient.grpc`` that every service uses.

- numpy dicts in and out, no ``InferInput`` plumbing in service code;
- bounded retries (exponential backoff) only on UNAVAILABLE — every call here is
  idempotent (model forwards are pure);
- tritonclient errors become clinisynth errors in one place (:func:`translate_error`);
- thread-safe: one gRPC channel shared by all threads (tritonclient's non-streaming calls
  are thread-safe; the streaming API is not used here);
- a model argument is a component *address* (``packing.py``): a Triton model name (the split
  layout) or ``<name>.packed/<role>`` (the packed layout), mapped here — and only here — to the
  Triton model and its ``<role>__<tensor>`` names, so services never know the layout;
- every call carries Triton's restricted-protocol key (:data:`KEY_HEADER`): Triton refuses
  load / unload, config, logging and inference without it (see ``launcher.py``).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from clinisynth_server.errors import (
    Cancelled,
    ClinisynthError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from clinisynth_server.triton import packing

T = TypeVar("T")

_MAX_MESSAGE = 256 * 1024 * 1024
_UNKNOWN_MODEL = re.compile(
    r"unknown model|is not found|not found|no version|unavailable version|"
    r"is not available|is not ready|unknown version",
    re.IGNORECASE,
)
_INPUT_NAME = re.compile(r"input '([^']+)'")
# A dead Triton is restarted by the stack within seconds: reconnect soon after it is back
# (gRPC's default backoff grows to 120 s and would keep a healthy server unused that long).
_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# The header Triton's restricted protocols check: as named on its command line and over HTTP;
# over gRPC Triton expects it with the ``triton-grpc-protocol-`` prefix.
KEY_HEADER = "clinisynth-triton-key"
GRPC_KEY_HEADER = f"triton-grpc-protocol-{KEY_HEADER}"
# File holding the key, for services started by the stack (the path, never the key, is in env).
KEY_FILE_ENV = "CLINISYNTH_TRITON_KEY_FILE"
_PROCESS_KEYS: dict[str, str] = {}
_PROCESS_KEYS_LOCK = threading.Lock()


def remember_key(url: str, key: str) -> None:
    """Called by the launcher: a Triton started by this process is usable by its clients here
    (tests, benchmarks, the stack's own registration) without handing the key around."""
    with _PROCESS_KEYS_LOCK:
        _PROCESS_KEYS[url] = key


def resolve_key(url: str, key: str | None = None, key_file: Path | str | None = None) -> str:
    """The key for Triton at ``url``: given, else read from ``key_file``, else remembered from
    a launch in this process, else read from ``$CLINISYNTH_TRITON_KEY_FILE``; "" for none."""
    if key:
        return key
    if key_file:
        return _read_key(Path(key_file))
    with _PROCESS_KEYS_LOCK:
        known = _PROCESS_KEYS.get(url)
    if known:
        return known
    env_file = os.environ.get(KEY_FILE_ENV)
    return _read_key(Path(env_file)) if env_file else ""


def _read_key(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot read the Triton key file {path}: {exc.strerror}", reason="TRITON_KEY_FILE"
        ) from exc


@dataclass(frozen=True)
class ModelEntry:
    """One row of Triton's repository index (``state``: READY, UNAVAILABLE, LOADING …)."""

    name: str
    version: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class ModelStatistics:
    """Triton's counters for one model version (cumulative since it loaded).

    ``inference_count`` counts batch items, ``execution_count`` model executions: with
    dynamic batching the second is smaller.
    """

    name: str
    version: str
    inference_count: int
    execution_count: int
    success_count: int
    fail_count: int
    queue_ns: int
    compute_infer_ns: int
    batch_sizes: dict[int, int]  # batch size → executions


def translate_error(exc: InferenceServerException, *, model: str = "") -> ClinisynthError:
    """Map a tritonclient error to the clinisynth tree (the only place this happens)."""
    status = (exc.status() or "").upper()
    message = exc.message() or str(exc)
    what = f"triton{f' model {model!r}' if model else ''}: {message}"
    meta = {"triton_status": status} if status else {}
    if "UNAVAILABLE" in status:
        # Triton answers UNAVAILABLE both for "server down" and "model not loaded".
        if _UNKNOWN_MODEL.search(message) and "connect" not in message.lower():
            return NotFound(what, reason="TRITON_MODEL_NOT_READY", metadata=meta)
        return Unavailable(what, reason="TRITON_UNAVAILABLE", metadata=meta)
    if "NOT_FOUND" in status:
        return NotFound(what, reason="TRITON_MODEL_NOT_FOUND", metadata=meta)
    if "INVALID_ARGUMENT" in status:
        if _UNKNOWN_MODEL.search(message) and "input" not in message.lower():
            return NotFound(what, reason="TRITON_MODEL_NOT_FOUND", metadata=meta)
        match = _INPUT_NAME.search(message)
        field = f"inputs.{match.group(1)}" if match else "inputs"
        return InvalidArgument.for_field(field, message)
    if "DEADLINE_EXCEEDED" in status:
        return DeadlineExceeded(what, metadata=meta)
    if "CANCELLED" in status:
        return Cancelled(what, metadata=meta)
    if "RESOURCE_EXHAUSTED" in status:
        return ResourceExhausted(what, metadata=meta)
    if "FAILED_PRECONDITION" in status:
        return FailedPrecondition(what, metadata=meta)
    return Internal(what, reason="TRITON_ERROR", metadata=meta)


def _unprefixed(exc: InvalidArgument, component: str) -> InvalidArgument:
    """``exc`` with a packed model's ``<component>__`` tensor prefix taken out of its text."""
    prefix = packing.tensor_name(component, "")
    return InvalidArgument(
        exc.message.replace(prefix, ""),
        violations=[
            FieldViolation(v.field.replace(prefix, ""), v.description.replace(prefix, ""))
            for v in exc.violations
        ],
        reason=exc.reason,
        metadata=exc.metadata,
    )


class TritonClient:
    """Typed gRPC client for one Triton server (``url`` is ``host:port``).

    ``timeout_s`` bounds every call (per-call override on :meth:`infer`); ``retries`` is how
    many extra attempts an UNAVAILABLE call gets (backoff 0.1 s doubling, capped at 2 s).
    ``key`` / ``key_file``: Triton's restricted-protocol key (see :func:`resolve_key`).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 2,
        backoff_s: float = 0.1,
        key: str | None = None,
        key_file: Path | str | None = None,
    ) -> None:
        self.url = url
        secret = resolve_key(url, key, key_file)
        self._headers: dict[str, str] | None = {GRPC_KEY_HEADER: secret} if secret else None
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._lock = threading.Lock()
        self._closed = False
        self._scalar_cache: dict[str, frozenset[str]] = {}
        self._client = grpcclient.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                *_RECONNECT,
            ],
        )

    # -- inference --------------------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: list[str],
        *,
        version: str = "",
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """One inference; arrays carry the batch dimension first. Returns ``outputs`` by name.

        ``model`` is a component address: for a packed component the inputs and outputs are
        renamed to the packed model's ``<role>__<tensor>`` and back.
        """
        if not outputs:
            raise InvalidArgument.for_field("outputs", "name at least one output")
        model, component = packing.split_address(model)
        if component:
            try:
                renamed = self.infer(
                    model,
                    {packing.tensor_name(component, n): v for n, v in inputs.items()},
                    [packing.tensor_name(component, n) for n in outputs],
                    version=version,
                    timeout_s=timeout_s,
                )
            except InvalidArgument as exc:  # name the caller's input, not the packed one
                raise _unprefixed(exc, component) from exc
            return {n: renamed[packing.tensor_name(component, n)] for n in outputs}
        infer_inputs = []
        scalar_inputs = (
            self._scalar_inputs(model)
            if any(np.ndim(v) == 1 for v in inputs.values())
            else frozenset()
        )
        for name, value in inputs.items():
            arr = np.ascontiguousarray(value)
            if name in scalar_inputs and arr.ndim == 1:
                arr = arr[:, None]  # one value per item: [B] travels as dims [B, 1]
            try:
                dtype = np_to_triton_dtype(arr.dtype)
            except Exception:
                dtype = None
            if dtype is None:
                raise InvalidArgument.for_field(f"inputs.{name}", f"unsupported dtype {arr.dtype}")
            tensor = grpcclient.InferInput(name, list(arr.shape), dtype)
            tensor.set_data_from_numpy(arr)
            infer_inputs.append(tensor)
        requested = [grpcclient.InferRequestedOutput(n) for n in outputs]
        timeout = self.timeout_s if timeout_s is None else timeout_s

        def call() -> Any:
            return self._client.infer(
                model,
                infer_inputs,
                model_version=str(version),
                outputs=requested,
                client_timeout=timeout,
                headers=self._headers,
            )

        result = self._call(call, model=model)
        out: dict[str, np.ndarray] = {}
        for name in outputs:
            arr = result.as_numpy(name)
            if arr is None:
                raise Internal(f"triton model {model!r} returned no output {name!r}")
            out[name] = arr
        return out

    def _scalar_inputs(self, model: str) -> frozenset[str]:
        """Inputs declared ``dims: [1]`` + ``reshape: { shape: [] }`` (one scalar per item).

        Callers pass those as shape ``[B]``; Triton wants ``[B, 1]`` on the wire. Looked up
        once per model from its config (cache dropped on load/unload).
        """
        with self._lock:
            cached = self._scalar_cache.get(model)
        if cached is not None:
            return cached
        try:
            config = self.model_config(model)
        except ClinisynthError:
            return frozenset()  # let the inference itself report what is wrong
        names = frozenset(
            spec["name"]
            for spec in config.get("input", [])
            if "reshape" in spec
            and not spec["reshape"].get("shape")
            and [int(d) for d in spec.get("dims", [])] == [1]
        )
        with self._lock:
            self._scalar_cache[model] = names
        return names

    def _forget(self, model: str) -> None:
        with self._lock:
            self._scalar_cache.pop(model, None)

    # -- health -------------------------------------------------------------------------------
    def is_ready(self, *, timeout_s: float | None = None) -> bool:
        """Server ready; False (not an error) when it cannot be reached."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return bool(self._client.is_server_ready(headers=self._headers, client_timeout=timeout))
        except InferenceServerException:
            return False

    def model_ready(self, name: str, version: str = "") -> bool:
        name = packing.served_model(name)
        try:
            return bool(
                self._client.is_model_ready(
                    name, str(version), headers=self._headers, client_timeout=self.timeout_s
                )
            )
        except InferenceServerException as exc:
            err = translate_error(exc, model=name)
            if isinstance(err, NotFound):
                return False
            raise err from exc

    # -- repository -----------------------------------------------------------------------
    def load_model(self, name: str, *, timeout_s: float = 600.0) -> None:
        """(Re)load a model: picks up new versions and config; old versions keep serving.

        :class:`NotFound` when the repository has no such model, :class:`FailedPrecondition`
        (with Triton's reason) when it exists but fails to load. Loading imports torch in a
        fresh python stub, hence the long default ``timeout_s``. An address loads its model.
        """
        name = packing.served_model(name)
        self._forget(name)
        try:
            self._call(
                lambda: self._client.load_model(
                    name, headers=self._headers, client_timeout=timeout_s
                ),
                model=name,
            )
        except (Internal, InvalidArgument, NotFound) as exc:
            if name not in {entry.name for entry in self.repository_index()}:
                raise NotFound(f"triton model repository has no model {name!r}") from exc
            raise FailedPrecondition(
                f"triton could not load model {name!r}: {exc.message}",
                reason="TRITON_LOAD_FAILED",
            ) from exc

    def unload_model(self, name: str) -> None:
        """Ask Triton to unload every version (asynchronous: the index shows UNLOADING first).

        New requests for the model get :class:`NotFound` at once; in-flight ones finish.
        An address unloads its Triton model (for a packed one: every component of it).
        """
        name = packing.served_model(name)
        self._forget(name)
        self._call(
            lambda: self._client.unload_model(
                name, headers=self._headers, client_timeout=self.timeout_s
            ),
            model=name,
        )

    def repository_index(self) -> list[ModelEntry]:
        index = self._call(
            lambda: self._client.get_model_repository_index(
                headers=self._headers, as_json=True, client_timeout=self.timeout_s
            )
        )
        return [
            ModelEntry(
                name=m["name"],
                version=str(m.get("version", "")),
                state=str(m.get("state", "")),
                reason=str(m.get("reason", "")),
            )
            for m in index.get("models", [])
        ]

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        """The model's effective config (Triton's JSON form of ``config.pbtxt``).

        For a packed address, ``parameters`` are that component's (its ``<role>__*`` ones,
        unprefixed, over the shared ones): what its split model's config would say.
        """
        name, component = packing.split_address(name)
        response = self._call(
            lambda: self._client.get_model_config(
                name,
                str(version),
                headers=self._headers,
                as_json=True,
                client_timeout=self.timeout_s,
            ),
            model=name,
        )
        config: dict[str, Any] = response.get("config", response)
        if component:
            raw = config.get("parameters") or {}
            flat = {k: str(v.get("string_value", "")) for k, v in raw.items()}
            own = packing.component_parameters(flat, component)
            config = {**config, "parameters": {k: {"string_value": v} for k, v in own.items()}}
        return config

    def statistics(self, name: str, version: str = "") -> list[ModelStatistics]:
        """Per-version counters (inferences, executions, batch sizes, queue/compute time).

        For a packed address: the packed model's counters (every component together)."""
        name = packing.served_model(name)
        response = self._call(
            lambda: self._client.get_inference_statistics(
                name,
                str(version),
                headers=self._headers,
                as_json=True,
                client_timeout=self.timeout_s,
            ),
            model=name,
        )
        stats = []
        for m in response.get("model_stats", []):
            inference = m.get("inference_stats", {})
            stats.append(
                ModelStatistics(
                    name=m["name"],
                    version=str(m.get("version", "")),
                    inference_count=int(m.get("inference_count", 0)),
                    execution_count=int(m.get("execution_count", 0)),
                    success_count=int(inference.get("success", {}).get("count", 0)),
                    fail_count=int(inference.get("fail", {}).get("count", 0)),
                    queue_ns=int(inference.get("queue", {}).get("ns", 0)),
                    compute_infer_ns=int(inference.get("compute_infer", {}).get("ns", 0)),
                    batch_sizes={
                        int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0))
                        for b in m.get("batch_stats", [])
                    },
                )
            )
        return stats

    # -- plumbing ---------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], *, model: str = "") -> T:
        if self._closed:
            raise FailedPrecondition("TritonClient is closed")
        attempt = 0
        while True:
            try:
                return fn()
            except InferenceServerException as exc:
                err = translate_error(exc, model=model)
                if not isinstance(err, Unavailable) or attempt >= self.retries:
                    raise err from exc
            attempt += 1
            time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 2.0))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
