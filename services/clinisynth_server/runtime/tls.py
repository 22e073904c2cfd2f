"""TLS for the gRPC port: certificates re-read when their files change, and client certificates.

Why a reloader: cert-manager (or the compose script) renews the certificate with a new key, and a
restart to pick it up drops every open stream. gRPC Python's dynamic credentials ask a fetcher
before every new handshake; :class:`ReloadingCertificates` answers from the files on disk:

- each handshake costs one ``stat`` per file; the files are read only when their stamp (inode,
  size, mtime) changed, and served only when their content did (a ``touch`` changes nothing);
- a renewed set is checked before it is served: the chain and key parse, the key is the
  certificate's, the client CA bundle (when set) parses. A half-written or mismatched set (the
  certificate renewed, the key not yet) keeps the old one serving, is logged and counted once per
  change on disk, and is tried again when the files change next;
- new connections get the new certificate; connections already open keep theirs.

Client certificates (mTLS, ``CLINISYNTH_TLS_CLIENT_CA``): gRPC Python can only *require* one
(its server credentials either never ask for a client certificate or ask and refuse a handshake
without one), so with a client CA every connection presents a certificate the bundle verifies.
:func:`peer_certificate` reads the verified certificate of a call for :mod:`.auth`.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from clinisynth_server.errors import InvalidArgument

log = logging.getLogger(__name__)

CERT_SETTING = "CLINISYNTH_TLS_CERT"
KEY_SETTING = "CLINISYNTH_TLS_KEY"
CLIENT_CA_SETTING = "CLINISYNTH_TLS_CLIENT_CA"
# Subject alternative name kinds an account may name, as ``KIND:value`` (OpenSSL's spelling).
SAN_KINDS = ("URI", "DNS", "email", "IP")


class TlsFilesError(ValueError):
    """A certificate set on disk that cannot be served; ``setting`` names the file at fault."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.reason = message


@dataclass(frozen=True)
class CertificateSet:
    """A validated certificate chain, its key and the optional client CA bundle (PEM bytes)."""

    chain: bytes
    key: bytes
    client_ca: bytes | None
    serial: int
    not_after: float  # Unix seconds
    digest: str

    def configuration(self) -> Any:
        """The set as gRPC's server certificate configuration."""
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.chain)], root_certificates=self.client_ca
        )


def _certificates(pem: bytes, setting: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TlsFilesError(setting, f"not a PEM certificate (chain): {exc}") from None
    if not certs:
        raise TlsFilesError(setting, "holds no certificate")
    return certs


def validate(chain: bytes, key: bytes, client_ca: bytes | None) -> CertificateSet:
    """Check a set before it is served: it parses and the key belongs to the certificate."""
    leaf = _certificates(chain, CERT_SETTING)[0]
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsFilesError(KEY_SETTING, f"not an unencrypted PEM private key: {exc}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TlsFilesError(KEY_SETTING, f"is not the key of the certificate in {CERT_SETTING}")
    if client_ca is not None:
        _certificates(client_ca, CLIENT_CA_SETTING)
    digest = hashlib.sha256(b"\0".join((chain, key, client_ca or b""))).hexdigest()
    return CertificateSet(
        chain, key, client_ca, leaf.serial_number, leaf.not_valid_after_utc.timestamp(), digest
    )


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows the symlinks of a Kubernetes Secret mount (..data swap)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ReloadingCertificates:
    """The certificate set the gRPC port serves, re-read from its files when they change.

    ``on_reload(outcome)`` is told ``reloaded`` or ``failed`` (a metric), ``on_serving(set)`` the
    set now served (its expiry, a metric). The first load must succeed: a service never starts
    without a certificate it can serve (INVALID_ARGUMENT naming the setting).
    """

    def __init__(
        self,
        cert: str,
        key: str,
        client_ca: str = "",
        *,
        on_reload: Callable[[str], None] | None = None,
        on_serving: Callable[[CertificateSet], None] | None = None,
    ) -> None:
        self.paths = tuple(p for p in (cert, key, client_ca) if p)
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._on_reload = on_reload or (lambda outcome: None)
        self._on_serving = on_serving or (lambda served: None)
        self._lock = threading.Lock()
        self._stamps = self._current_stamps()
        try:
            self.served = self._read()
        except TlsFilesError as exc:
            raise InvalidArgument.for_field(exc.setting, exc.reason) from None
        self._on_serving(self.served)

    def _current_stamps(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(_stamp(p) for p in self.paths)

    def _read(self) -> CertificateSet:
        blobs: list[bytes] = []
        for setting, path in (
            (CERT_SETTING, self.cert),
            (KEY_SETTING, self.key),
            (CLIENT_CA_SETTING, self.client_ca),
        ):
            if not path:
                continue
            try:
                with open(path, "rb") as f:
                    blobs.append(f.read())
            except OSError as exc:
                raise TlsFilesError(setting, f"cannot read {path!r}: {exc}") from None
        return validate(blobs[0], blobs[1], blobs[2] if self.client_ca else None)

    def check(self) -> CertificateSet | None:
        """A renewed, valid set to serve from now on, or ``None``: keep serving the current one."""
        with self._lock:
            stamps = self._current_stamps()
            if stamps == self._stamps:
                return None
            self._stamps = stamps  # a bad set is reported once, tried again when files change
            try:
                fresh = self._read()
            except TlsFilesError as exc:
                log.error(
                    "TLS certificate files changed but cannot be served (%s); still serving "
                    "serial %x",
                    exc,
                    self.served.serial,
                )
                self._on_reload("failed")
                return None
            if fresh.digest == self.served.digest:
                return None
            self.served = fresh
        log.info("TLS certificate reloaded: now serving serial %x", fresh.serial)
        self._on_reload("reloaded")
        self._on_serving(fresh)
        return fresh

    def fetch(self) -> Any:
        """gRPC's certificate-configuration fetcher: called before every new handshake."""
        try:
            fresh = self.check()
        except Exception:  # never let a reload break the handshake of the set being served
            log.exception("TLS certificate reload failed")
            return None
        return fresh.configuration() if fresh is not None else None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that serve the current set and pick up renewed files."""
        return grpc.dynamic_ssl_server_credentials(
            self.served.configuration(),
            self.fetch,
            require_client_authentication=bool(self.client_ca),
        )


# --- the client certificate of a call ---------------------------------------------------------


@dataclass(frozen=True)
class PeerCertificate:
    """A verified client certificate: what an account may be keyed by (docs/SECURITY.md)."""

    sha256: str  # hex SHA-256 of the DER certificate (its fingerprint)
    subject: str  # RFC 4514, e.g. "CN=pacs-bridge,O=Hospital"
    sans: frozenset[str]  # "URI:spiffe://...", "DNS:host", "email:a@b", "IP:10.0.0.1"
    serial: int = 0

    def describe(self) -> str:
        """How a log or an error names the certificate (never the key or the whole PEM)."""
        return f"{self.subject or '(empty subject)'} sha256:{self.sha256[:16]}"


def _san_values(cert: x509.Certificate) -> frozenset[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    out = {f"URI:{v}" for v in ext.get_values_for_type(x509.UniformResourceIdentifier)}
    out |= {f"DNS:{v.lower()}" for v in ext.get_values_for_type(x509.DNSName)}
    out |= {f"email:{v}" for v in ext.get_values_for_type(x509.RFC822Name)}
    out |= {f"IP:{v}" for v in ext.get_values_for_type(x509.IPAddress)}
    return frozenset(out)


@functools.lru_cache(maxsize=256)
def parse_peer_certificate(pem: bytes) -> PeerCertificate:
    """The identity fields of a PEM certificate (cached: a client sends the same one each call)."""
    cert = x509.load_pem_x509_certificate(pem)
    return PeerCertificate(
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
        subject=cert.subject.rfc4514_string(),
        sans=_san_values(cert),
        serial=cert.serial_number,
    )


def peer_certificate(context: grpc.ServicerContext) -> PeerCertificate | None:
    """The client certificate gRPC verified for this call's connection, or ``None``.

    gRPC fills ``x509_pem_cert`` only for a certificate that passed verification against the
    client CA, so whatever is here was vouched for by that CA.
    """
    try:
        auth = context.auth_context()
    except Exception:  # a context without a transport (an in-process test double)
        return None
    pems = auth.get("x509_pem_cert") if auth else None
    if not pems:
        return None
    try:
        return parse_peer_certificate(bytes(pems[0]))
    except ValueError:
        log.warning("client certificate of %s cannot be parsed", context.peer())
        return None


def normalize_san(value: str) -> str:
    """An account's ``cert_san`` in the form :class:`PeerCertificate` lists them; ValueError
    names what is wrong."""
    kind, sep, rest = value.partition(":")
    kinds = {k.lower(): k for k in SAN_KINDS}
    if not sep or kind.lower() not in kinds or not rest.strip():
        raise ValueError(f"KIND:value with KIND one of {', '.join(SAN_KINDS)}, got {value!r}")
    kind, rest = kinds[kind.lower()], rest.strip()
    if kind == "DNS":
        rest = rest.lower()
    elif kind == "IP":
        rest = str(ipaddress.ip_address(rest))
    return f"{kind}:{rest}"


def normalize_subject(value: str) -> str:
    """An account's ``cert_subject`` (RFC 4514) as the certificate's subject is spelled."""
    try:
        name = x509.Name.from_rfc4514_string(value)
    except ValueError as exc:
        raise ValueError(f"an RFC 4514 name such as 'CN=robot,O=Hospital': {exc}") from None
    if not len(name):
        raise ValueError("an RFC 4514 name such as 'CN=robot,O=Hospital', got an empty one")
    return name.rfc4514_string()
