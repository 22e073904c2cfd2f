"""A test identity provider: an RSA key pair made in the test, its JWKS and signed tokens."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISS, AUD = "https://idp.test", "clinisynth"


class Issuer:
    """One signing key (``kid`` k1); :meth:`token` signs any claims over valid defaults."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwks: dict[str, Any] = {"keys": [{**jwk, "kid": "k1"}]}

    def token(self, *role_names: str, sub: str = "dr_a", **over: Any) -> str:
        now = int(time.time())
        claims = {"iss": ISS, "aud": AUD, "sub": sub, "exp": now + 600, "nbf": now, "iat": now}
        claims["clinisynth_roles"] = list(role_names)
        claims.update(over)
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "k1"})

    def settings(self, folder: pathlib.Path) -> dict[str, str]:
        """The service settings (``auth_*``, without prefix) that trust this issuer."""
        (folder / "jwks.json").write_text(json.dumps(self.jwks))
        return {"auth_jwks": str(folder / "jwks.json"), "auth_issuer": ISS, "auth_audience": AUD}
