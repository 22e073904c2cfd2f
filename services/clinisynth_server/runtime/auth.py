"""Authentication: an ``Authenticator`` sees call metadata and returns a :class:`Principal`.

Three kinds of bearer token, tried in this order (docs/SECURITY.md):

- a **service account**: a static token whose SHA-256 is listed, with a name, roles and a
  tenant, in the file ``CLINISYNTH_AUTH_SERVICE_ACCOUNTS`` (the file holds digests, never tokens);
- a **legacy static token** (``CLINISYNTH_AUTH_TOKENS`` without a mapping): a principal with
  every role, as before identities existed;
- a **JWT** from an OIDC issuer: RS256 / ES256 signature checked against the issuer's JWKS
  (``CLINISYNTH_AUTH_JWKS``, a file or an https URL, cached and refreshed on an unknown ``kid``),
  ``iss``, ``aud``, ``exp`` / ``nbf`` with a small clock skew. ``none`` and HS* are refused: a
  public key must never double as an HMAC secret.

A **client certificate** (mTLS, ``CLINISYNTH_TLS_CLIENT_CA``) verified by the TLS handshake is a
principal too, through ``cert_sha256`` / ``cert_san`` / ``cert_subject`` entries of the same
service-accounts file (``via="mtls"``). A bearer token, when one is sent, wins: the certificate
then only admitted the connection (a gateway holding one certificate calls for many users). A
certificate without a matching account and without a token is UNAUTHENTICATED.

Nothing configured = authentication off (every caller is :data:`~.roles.ANONYMOUS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import pathlib
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jwt

from clinisynth_server.errors import InvalidArgument, Unauthenticated, Unavailable
from clinisynth_server.runtime.roles import ALL_ROLES, ANONYMOUS, PUBLIC, Principal, is_public
from clinisynth_server.runtime.tls import PeerCertificate, normalize_san, normalize_subject

if TYPE_CHECKING:
    from clinisynth_server.runtime.config import ServiceConfig

log = logging.getLogger(__name__)
# Signature algorithms a JWT may use: asymmetric only (``none`` and HS* are never accepted).
ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"})
MAX_JWKS_BYTES = 1024 * 1024
_ATTR = "_clinisynth_principal"


class Authenticator(Protocol):
    def authenticate(
        self,
        method: str,
        metadata: Sequence[tuple[str, str | bytes]],
        peer: PeerCertificate | None = None,
    ) -> Principal:
        """Return the caller's principal or raise :class:`Unauthenticated`; ``peer`` is the
        connection's verified client certificate (mTLS), if any."""
        ...


def attach(context: object, principal: Principal) -> None:
    """Record the call's principal on its gRPC context (the interceptor does this)."""
    setattr(context, _ATTR, principal)


def attached(context: object) -> Principal | None:
    """The principal recorded on this call, ``None`` before (or without) authentication."""
    principal = getattr(context, _ATTR, None)
    return principal if isinstance(principal, Principal) else None


def principal_of(context: object) -> Principal:
    """The authenticated caller of this call (set by the interceptor before the servicer runs)."""
    return attached(context) or ANONYMOUS


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The token of ``authorization: Bearer <token>``; missing / malformed → UNAUTHENTICATED."""
    header = next((v for k, v in metadata if k.lower() == "authorization"), None)
    if header is None:
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
    value = header.decode(errors="replace") if isinstance(header, bytes) else header
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    return token


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AllowAll:
    """Authentication off: everyone is :data:`ANONYMOUS` (all roles)."""

    def authenticate(
        self,
        method: str,
        metadata: Sequence[tuple[str, str | bytes]],
        peer: PeerCertificate | None = None,
    ) -> Principal:
        return ANONYMOUS


CERT_KEYS = ("cert_sha256", "cert_san", "cert_subject")


def _read_accounts(path: str, setting: str) -> list[tuple[dict[str, Any], Principal, str]]:
    """Every ``[[accounts]]`` entry, validated by field: (entry, principal, where)."""
    try:
        data = tomllib.loads(pathlib.Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument.for_field(setting, f"cannot read {path!r}: {exc}") from exc
    out: list[tuple[dict[str, Any], Principal, str]] = []
    entries = data.get("accounts", [])
    if not isinstance(entries, list):
        raise InvalidArgument.for_field(f"{setting}: accounts", "an array of tables")
    for i, entry in enumerate(entries):
        where = f"{setting}: accounts[{i}]"
        if not isinstance(entry, dict):
            raise InvalidArgument.for_field(where, "a table")
        name, roles, tenant = entry.get("name"), entry.get("roles", []), entry.get("tenant", "")
        if not isinstance(name, str) or not name:
            raise InvalidArgument.for_field(f"{where}.name", "required: a string")
        if "token_sha256" not in entry and not any(k in entry for k in CERT_KEYS):
            raise InvalidArgument.for_field(
                f"{where}.token_sha256", f"required unless the account has one of {CERT_KEYS}"
            )
        if not isinstance(roles, list) or not set(roles) <= ALL_ROLES:
            raise InvalidArgument.for_field(f"{where}.roles", f"a list of {sorted(ALL_ROLES)}")
        if not isinstance(tenant, str):
            raise InvalidArgument.for_field(f"{where}.tenant", "a string")
        out.append((entry, Principal(name, frozenset(roles), tenant), where))
    return out


def _hex_digest(entry: Mapping[str, Any], key: str, where: str) -> str:
    digest = str(entry.get(key, "")).lower().replace(":", "")  # fingerprints print with colons
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidArgument.for_field(f"{where}.{key}", "64 hex digits (SHA-256)")
    return digest


def load_service_accounts(path: str, setting: str) -> dict[str, Principal]:
    """``[[accounts]] name, roles, tenant, token_sha256`` → {digest: principal}."""
    accounts: dict[str, Principal] = {}
    for entry, principal, where in _read_accounts(path, setting):
        if "token_sha256" in entry:
            digest = _hex_digest(entry, "token_sha256", where)
            accounts[digest] = dataclasses.replace(principal, via="service-account")
    return accounts


class CertificateAccounts:
    """Verified client certificates → principals (``via="mtls"``), from the accounts file.

    Keys, most specific first: ``cert_sha256`` (pins one certificate; a renewal changes it),
    ``cert_san`` (``URI:`` / ``DNS:`` / ``email:`` / ``IP:`` a subject alternative name; stable
    across renewals, the one to prefer) and ``cert_subject`` (the RFC 4514 subject). Two accounts
    may not claim the same key; a certificate whose names match two accounts is refused.
    """

    def __init__(self, accounts: Sequence[tuple[str, str, Principal]] = ()) -> None:
        self._by: dict[tuple[str, str], Principal] = {}
        for kind, key, principal in accounts:
            self._by[(kind, key)] = principal

    @classmethod
    def load(cls, path: str, setting: str) -> CertificateAccounts:
        entries: list[tuple[str, str, Principal]] = []
        seen: dict[tuple[str, str], str] = {}
        for entry, principal, where in _read_accounts(path, setting):
            for kind in CERT_KEYS:
                if kind not in entry:
                    continue
                raw = entry[kind]
                field = f"{where}.{kind}"
                if kind == "cert_sha256":
                    key = _hex_digest(entry, kind, where)
                elif not isinstance(raw, str):
                    raise InvalidArgument.for_field(field, "a string")
                else:
                    try:
                        key = normalize_san(raw) if kind == "cert_san" else normalize_subject(raw)
                    except ValueError as exc:
                        raise InvalidArgument.for_field(field, str(exc)) from None
                if (kind, key) in seen:
                    raise InvalidArgument.for_field(
                        field, f"{key!r} already names {seen[kind, key]}"
                    )
                seen[(kind, key)] = where
                entries.append((kind, key, dataclasses.replace(principal, via="mtls")))
        return cls(entries)

    def __bool__(self) -> bool:
        return bool(self._by)

    def principal(self, peer: PeerCertificate) -> Principal:
        """The account of ``peer``, or UNAUTHENTICATED (no account, or two of them)."""
        found = self._by.get(("cert_sha256", peer.sha256))
        if found is not None:
            return found
        by_san = {self._by[("cert_san", s)] for s in peer.sans if ("cert_san", s) in self._by}
        if len(by_san) > 1:
            names = sorted(p.name for p in by_san)
            raise Unauthenticated(
                f"client certificate {peer.describe()} matches several accounts: {names}"
            )
        if by_san:
            return by_san.pop()
        found = self._by.get(("cert_subject", peer.subject))
        if found is not None:
            return found
        raise Unauthenticated(
            f"client certificate {peer.describe()} maps to no account and no bearer token was sent"
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JwksSource:
    """The issuer's signing keys by ``kid``: a file (re-read when it changes) or an https URL.

    A URL's keys are cached for ``cache_s`` and refetched early when a token names an unknown
    ``kid`` (the issuer rotated), at most once per ``min_refresh_s`` so tokens with made-up kids
    cannot turn every call into a fetch. A fetch that fails keeps the cached keys; with no keys
    at all the call is UNAVAILABLE (a missing dependency, not the caller's fault).
    """

    def __init__(
        self,
        location: str,
        *,
        timeout_s: float = 5.0,
        cache_s: float = 300.0,
        min_refresh_s: float = 10.0,
        setting: str = "CLINISYNTH_AUTH_JWKS",
    ) -> None:
        url = urllib.parse.urlsplit(location)
        self.url = location if url.scheme in ("http", "https") else ""
        if url.scheme == "http" and not _loopback(url.hostname or ""):
            raise InvalidArgument.for_field(setting, "an https URL (http only on loopback)")
        self.path = pathlib.Path(url.path if url.scheme == "file" else location)
        self.timeout_s, self.cache_s, self.min_refresh_s = timeout_s, cache_s, min_refresh_s
        self._lock = threading.Lock()
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = -float("inf")
        self._stamp: tuple[float, int] | None = None
        self.fetches = 0

    def _read(self) -> bytes:
        if not self.url:
            return self.path.read_bytes()
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return bytes(response.read(MAX_JWKS_BYTES + 1))

    def _load(self) -> None:
        self.fetches += 1
        self._fetched = time.monotonic()
        try:
            raw = self._read()
            if len(raw) > MAX_JWKS_BYTES:
                raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            data = json.loads(raw)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            log.warning("JWKS %s: %s", self.url or self.path, exc)
            return
        keys: dict[str, jwt.PyJWK] = {}
        for entry in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") not in ("RSA", "EC"):
                continue  # symmetric ("oct") keys are never signing keys here
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:
                log.warning("JWKS: skipping key %r: %s", entry.get("kid"), exc)
                continue
            keys[str(entry.get("kid", ""))] = key
        self._keys = keys

    def _changed(self) -> bool:
        if self.url:
            return time.monotonic() - self._fetched >= self.cache_s
        try:
            st = self.path.stat()
        except OSError:
            return True
        stamp = (st.st_mtime, st.st_size)
        changed, self._stamp = stamp != self._stamp, stamp
        return changed

    def key(self, kid: str) -> jwt.PyJWK:
        with self._lock:
            if self._changed():
                self._load()
            if kid not in self._keys and time.monotonic() - self._fetched >= self.min_refresh_s:
                self._load()
            if not self._keys:
                raise Unavailable("the token issuer's keys (JWKS) cannot be loaded")
            if not kid and len(self._keys) == 1:
                return next(iter(self._keys.values()))
            found = self._keys.get(kid)
        if found is None:
            raise Unauthenticated("token signed with an unknown key (kid)")
        return found


class JwtVerifier:
    """Verify an OIDC access / ID token and turn its claims into a :class:`Principal`."""

    def __init__(
        self,
        keys: JwksSource,
        *,
        issuer: str,
        audience: str,
        algorithms: Sequence[str] = ("RS256", "ES256"),
        roles_claim: str = "clinisynth_roles",
        tenant_claim: str = "clinisynth_tenant",
        clock_skew_s: float = 30.0,
    ) -> None:
        self.keys, self.issuer, self.audience = keys, issuer, audience
        self.algorithms = tuple(algorithms)
        self.roles_claim, self.tenant_claim = roles_claim, tenant_claim
        self.clock_skew_s = clock_skew_s

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"bearer token is not a valid JWT: {exc}") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthenticated(f"token algorithm {alg!r} refused; allowed {self.algorithms}")
        key = self.keys.key(str(header.get("kid", "")))
        if key.key_type != ("EC" if str(alg).startswith("ES") else "RSA"):
            raise Unauthenticated(f"token algorithm {alg!r} does not match its key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[str(alg)],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.clock_skew_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not valid yet (nbf / iat)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token audience is not this service") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token issuer is not trusted") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"token refused: {exc}") from None
        return self.principal(claims)

    def principal(self, claims: Mapping[str, Any]) -> Principal:
        raw = claims.get(self.roles_claim, [])
        names = raw.replace(",", " ").split() if isinstance(raw, str) else raw
        roles = frozenset(r for r in names if isinstance(r, str)) & ALL_ROLES
        tenant = claims.get(self.tenant_claim, "")
        return Principal(
            str(claims["sub"]), roles, tenant if isinstance(tenant, str) else "", via="jwt"
        )


class BearerAuth:
    """Service accounts, then legacy static tokens, then JWTs (when an issuer is configured)."""

    def __init__(
        self,
        tokens: Sequence[str] = (),
        accounts: Mapping[str, Principal] | None = None,
        jwt_verifier: JwtVerifier | None = None,
        certificates: CertificateAccounts | None = None,
    ) -> None:
        self._tokens = [t.encode() for t in tokens if t]
        self._accounts = dict(accounts or {})
        self._jwt = jwt_verifier
        self._certificates = certificates or CertificateAccounts()

    def authenticate(
        self,
        method: str,
        metadata: Sequence[tuple[str, str | bytes]],
        peer: PeerCertificate | None = None,
    ) -> Principal:
        if is_public(method):
            return PUBLIC
        sent_token = any(k.lower() == "authorization" for k, _ in metadata)
        if peer is not None and not sent_token:
            return self._certificates.principal(peer)
        return self.for_token(bearer_token(metadata))

    def for_token(self, token: str) -> Principal:
        digest = token_sha256(token)
        account = self._accounts.get(digest)  # keyed by a digest: the lookup leaks no token
        if account is not None:
            return account
        if any(hmac.compare_digest(token.encode(), t) for t in self._tokens):
            return Principal(
                f"legacy-token-{digest[:8]}", ALL_ROLES, via="legacy-token", personal=False
            )
        if self._jwt is not None and token.count(".") == 2:
            return self._jwt.verify(token)
        raise Unauthenticated("unknown bearer token")


def authenticator_for(config: ServiceConfig) -> Authenticator:
    """The authenticator ``config`` describes; nothing configured = :class:`AllowAll`."""
    setting = "CLINISYNTH_AUTH_SERVICE_ACCOUNTS"
    accounts, certificates = {}, CertificateAccounts()
    if config.auth_service_accounts:
        accounts = load_service_accounts(config.auth_service_accounts, setting)
        certificates = CertificateAccounts.load(config.auth_service_accounts, setting)
    verifier = None
    if config.auth_jwks:
        for setting, value in (
            ("CLINISYNTH_AUTH_ISSUER", config.auth_issuer),
            ("CLINISYNTH_AUTH_AUDIENCE", config.auth_audience),
        ):
            if not value:
                raise InvalidArgument.for_field(setting, "required with CLINISYNTH_AUTH_JWKS")
        bad = [a for a in config.auth_algorithms if a not in ASYMMETRIC]
        if bad or not config.auth_algorithms:
            raise InvalidArgument.for_field(
                "CLINISYNTH_AUTH_ALGORITHMS", f"asymmetric only ({sorted(ASYMMETRIC)}), got {bad}"
            )
        verifier = JwtVerifier(
            JwksSource(
                config.auth_jwks,
                timeout_s=config.auth_jwks_timeout_s,
                cache_s=config.auth_jwks_cache_s,
            ),
            issuer=config.auth_issuer,
            audience=config.auth_audience,
            algorithms=config.auth_algorithms,
            roles_claim=config.auth_roles_claim,
            tenant_claim=config.auth_tenant_claim,
            clock_skew_s=config.auth_clock_skew_s,
        )
    # A client CA turns authentication on: a verified certificate is an identity to map, never
    # a pass to every role.
    if not (config.auth_tokens or accounts or verifier or certificates or config.tls_client_ca):
        return AllowAll()
    return BearerAuth(config.auth_tokens, accounts, verifier, certificates)
