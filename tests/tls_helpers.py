"""A test certificate authority: a CA made in the test and the server / client certificates it
signs, as PEM bytes, plus a raw TLS probe that reads the certificate a port serves."""

from __future__ import annotations

import datetime as dt
import pathlib
import socket
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Issued:
    cert: bytes  # PEM
    key: bytes  # PEM
    serial: int
    sha256: str  # hex fingerprint of the DER certificate

    def write(self, folder: pathlib.Path, stem: str) -> tuple[pathlib.Path, pathlib.Path]:
        cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert.write_bytes(self.cert)
        key.write_bytes(self.key)
        return cert, key


class TestCA:
    """One CA key; :meth:`server` and :meth:`client` issue leaf certificates it signs."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str = "clinisynth test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def _issue(
        self,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: list[x509.ObjectIdentifier],
        organization: str = "",
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization:  # DER order O, CN: RFC 4514 (most specific first) reads "CN=..,O=.."
            attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM),
            _pem_key(key),
            cert.serial_number,
            cert.fingerprint(hashes.SHA256()).hex(),
        )

    def server(self, *names: str, client_auth: bool = False) -> Issued:
        """A server certificate for ``names`` (default ``localhost``); ``client_auth``: usable
        as a client certificate too (a service's probe presents it)."""
        names = names or ("localhost",)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        usage = [ExtendedKeyUsageOID.SERVER_AUTH]
        if client_auth:
            usage.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        return self._issue(names[0], sans, usage)

    def client(self, common_name: str, *, uri: str = "", organization: str = "") -> Issued:
        """A client certificate (``client auth`` usage), optionally with a URI SAN."""
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)] if uri else []
        return self._issue(
            common_name, sans, [ExtendedKeyUsageOID.CLIENT_AUTH], organization=organization
        )


def served_serial(
    port: int, ca_pem: bytes, client: Issued | None = None, tmp: pathlib.Path | None = None
) -> int:
    """Open a new TLS connection to ``localhost:port`` and return the serial it was served."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])  # gRPC's servers speak HTTP/2 only
    if client is not None:
        assert tmp is not None, "a client certificate needs a folder for its files"
        cert, key = client.write(tmp, "probe-client")
        context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("localhost", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
