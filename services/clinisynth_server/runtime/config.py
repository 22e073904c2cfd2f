"""Typed, frozen settings built once from env vars (and an optional TOML file) and passed in.

Lookup order for a setting ``port`` of service ``generator``: ``CLINISYNTH_GENERATOR_PORT``, then
``CLINISYNTH_PORT`` (shared settings only), then the file named by ``CLINISYNTH_CONFIG``
(``[generator] port = ...`` or top level), then the default. Defaults just work on one machine.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clinisynth_server.errors import InvalidArgument

SERVICES = ("generator", "reward", "counterfactual", "finetune")
DEFAULT_PORTS = {"generator": 50051, "reward": 50052, "counterfactual": 50053, "finetune": 50054}
DEFAULT_METRICS_PORTS = {
    "generator": 9101,
    "reward": 9102,
    "counterfactual": 9103,
    "finetune": 9104,
}


def default_home() -> pathlib.Path:
    """Where the embedded stack keeps its state, store and logs (``CLINISYNTH_HOME``)."""
    return pathlib.Path(os.environ.get("CLINISYNTH_HOME", pathlib.Path.home() / ".clinisynth"))


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of one service process."""

    service: str
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    # Triton gRPC endpoint (host:port).
    triton_url: str = "127.0.0.1:8001"
    # File holding Triton's restricted-protocol key (0600); the key itself is never in env.
    triton_key_file: str = ""
    # Artifact store URL: a folder path / file:// URL, or s3://bucket[/prefix].
    store_url: str = ""
    # Authentication (docs/SECURITY.md); nothing set = authentication off.
    # Static bearer tokens; one without a service-account entry has every role (legacy).
    auth_tokens: tuple[str, ...] = ()
    # TOML file of service accounts: [[accounts]] name, roles, tenant, token_sha256.
    auth_service_accounts: str = ""
    # The OIDC issuer's signing keys: a JWKS file or an https URL; enables JWT bearer tokens.
    auth_jwks: str = ""
    auth_issuer: str = ""
    auth_audience: str = ""
    auth_algorithms: tuple[str, ...] = ("RS256", "ES256")
    auth_roles_claim: str = "clinisynth_roles"
    auth_tenant_claim: str = "clinisynth_tenant"
    # Seconds of clock difference tolerated on exp / nbf / iat.
    auth_clock_skew_s: float = 30.0
    auth_jwks_timeout_s: float = 5.0
    auth_jwks_cache_s: float = 300.0
    tls_cert: str = ""
    tls_key: str = ""
    # CA bundle that verifies client certificates (mTLS); set = every connection presents one.
    tls_client_ca: str = ""
    log_format: str = "text"
    log_level: str = "INFO"
    # Largest request / response message, bytes.
    max_message_bytes: int = 16 * 1024 * 1024
    # Pixels one request may decode from caller images in all (declared sizes, checked before
    # decoding; 4 x 4096²): small uploads can declare huge images.
    max_request_pixels: int = 4 * 4096 * 4096
    # Threads serving RPCs.
    workers: int = 16
    # Seconds to let in-flight calls finish on shutdown.
    grace_s: float = 5.0
    # The TOML file this config was read from (``CLINISYNTH_CONFIG``); tables such as
    # ``[pacs.NAME]`` that are not plain settings are read from it by their owners.
    config_file: str = ""
    # Service-specific settings (``CLINISYNTH_<SERVICE>_<KEY>`` not listed above).
    extra: Mapping[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str = "") -> str:
        return self.extra.get(key, default)

    def get_int(self, key: str, default: int, *, minimum: int | None = None) -> int:
        """A service-specific integer setting; a bad one is refused by its variable's name."""
        raw = self.get(key, str(default)) or str(default)
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or (minimum is not None and value < minimum):
            what = "an integer" if minimum is None else f"an integer >= {minimum}"
            raise InvalidArgument.for_field(
                f"CLINISYNTH_{self.service.upper()}_{key.upper()}", f"{what}, got {raw!r}"
            )
        return value


_SHARED = {
    "host",
    "triton_url",
    "triton_key_file",
    "store_url",
    "auth_tokens",
    "auth_service_accounts",
    "auth_jwks",
    "auth_issuer",
    "auth_audience",
    "auth_algorithms",
    "auth_roles_claim",
    "auth_tenant_claim",
    "auth_clock_skew_s",
    "auth_jwks_timeout_s",
    "auth_jwks_cache_s",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "log_format",
    "log_level",
    "max_message_bytes",
    "max_request_pixels",
    "workers",
    "grace_s",
}


def _coerce(name: str, raw: Any, kind: type) -> Any:
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is tuple:
            if isinstance(raw, (list, tuple)):
                return tuple(str(v) for v in raw)
            return tuple(t.strip() for t in str(raw).split(",") if t.strip())
        return str(raw)
    except ValueError as exc:
        raise InvalidArgument.for_field(name, f"cannot parse {raw!r}: {exc}") from exc


def _as_setting(value: Any) -> str:
    """A TOML value as the environment variable of the same setting would spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def load_config(
    service: str,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> ServiceConfig:
    """Build the config of ``service`` from env, the optional TOML file and ``overrides``."""
    if service not in SERVICES:
        raise InvalidArgument.for_field(
            "service", f"unknown service {service!r}; one of {SERVICES}"
        )
    env = os.environ if env is None else env
    file_values: dict[str, Any] = {}
    table: dict[str, Any] = {}
    cfg_path = env.get("CLINISYNTH_CONFIG")
    if cfg_path:
        data = tomllib.loads(pathlib.Path(cfg_path).read_text())
        file_values.update({k: v for k, v in data.items() if not isinstance(v, dict)})
        table = data.get(service, {})
        file_values.update(table)

    prefix = f"CLINISYNTH_{service.upper()}_"
    values: dict[str, Any] = {"service": service}
    known = {f.name: f for f in dataclasses.fields(ServiceConfig)}
    for name, fld in known.items():
        if name in ("service", "extra"):
            continue
        kind = {"int": int, "float": float, "tuple[str, ...]": tuple}.get(str(fld.type), str)
        raw: Any = env.get(prefix + name.upper())
        if raw is None and name in _SHARED:
            raw = env.get("CLINISYNTH_" + name.upper())
        if raw is None:
            raw = file_values.get(name)
        if raw is not None:
            values[name] = _coerce(prefix + name.upper(), raw, kind)
    if cfg_path:
        values.setdefault("config_file", cfg_path)
    values.setdefault("port", DEFAULT_PORTS[service])
    values.setdefault("metrics_port", DEFAULT_METRICS_PORTS[service])
    values.setdefault("store_url", str(default_home() / "store"))
    # Service-specific settings: the [<service>] table's other keys, as the environment would
    # give them (strings; lists comma-joined); CLINISYNTH_<SERVICE>_<KEY> wins over the file.
    extra = {
        key.lower(): _as_setting(val)
        for key, val in table.items()
        if key.lower() not in known and not isinstance(val, dict)
    }
    extra.update(
        {
            key[len(prefix) :].lower(): val
            for key, val in env.items()
            if key.startswith(prefix) and key[len(prefix) :].lower() not in known
        }
    )
    values["extra"] = extra
    values.update(overrides)
    return ServiceConfig(**values)
