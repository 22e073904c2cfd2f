"""Finding a running stack without flags: ``$CLINISYNTH_HOME/stack.json`` written by ``up``."""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field

SERVICES = ("generator", "reward", "counterfactual", "finetune")


def home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CLINISYNTH_HOME", pathlib.Path.home() / ".clinisynth"))


def state_file() -> pathlib.Path:
    return home() / "stack.json"


@dataclass(frozen=True)
class Endpoints:
    """gRPC addresses (host:port) of the services."""

    generator: str = ""
    reward: str = ""
    counterfactual: str = ""
    finetune: str = ""
    triton: str = ""
    review_url: str = ""
    metrics: dict[str, str] = field(default_factory=dict)
    # The stack serves TLS (``clinisynth up`` with CLINISYNTH_TLS_CERT / _KEY); trust ca_cert.
    tls: bool = False
    ca_cert: str = ""

    def for_service(self, service: str) -> str:
        return getattr(self, service)

    def to_dict(self) -> dict[str, object]:
        return {
            "generator": self.generator,
            "reward": self.reward,
            "counterfactual": self.counterfactual,
            "finetune": self.finetune,
            "triton": self.triton,
            "metrics": dict(self.metrics),
            "review_url": self.review_url,
            "tls": self.tls,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Endpoints:
        metrics = data.get("metrics")

        def text(key: str) -> str:
            return str(data.get(key) or "")

        return cls(
            generator=text("generator"),
            reward=text("reward"),
            counterfactual=text("counterfactual"),
            finetune=text("finetune"),
            triton=text("triton"),
            review_url=text("review_url"),
            ca_cert=text("ca_cert"),
            metrics={str(k): str(v) for k, v in metrics.items()}
            if isinstance(metrics, dict)
            else {},
            tls=data.get("tls") is True,
        )

    @classmethod
    def on_host(cls, host: str) -> Endpoints:
        """Every service on one host at its default port."""
        ports = {"generator": 50051, "reward": 50052, "counterfactual": 50053, "finetune": 50054}
        return cls(
            generator=f"{host}:{ports['generator']}",
            reward=f"{host}:{ports['reward']}",
            counterfactual=f"{host}:{ports['counterfactual']}",
            finetune=f"{host}:{ports['finetune']}",
            triton=f"{host}:8001",
        )


def discover() -> Endpoints | None:
    """Endpoints from env (``CLINISYNTH_<SERVICE>_ADDRESS``) over the stack's state file."""
    data: dict[str, object] = {}
    path = state_file()
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
    for svc in SERVICES:
        env = os.environ.get(f"CLINISYNTH_{svc.upper()}_ADDRESS")
        if env:
            data[svc] = env
    if not any(data.get(s) for s in SERVICES):
        return None
    return Endpoints.from_dict(data)
