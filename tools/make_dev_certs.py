"""Make a development CA and certificates for a TLS fleet (with the `cryptography` package).

    python tools/make_dev_certs.py DIR [--host NAME_OR_IP ...] [--tokens]

Writes into DIR:
  ca.pem, ca-key.pem          the CA (keep ca-key.pem off the servers)
  node.pem, node-key.pem      for cortex and every neuron: server and client use, its subject
                              alternative names are localhost, 127.0.0.1, ::1 and every --host
  client.pem, client-key.pem  for CLI / Python clients that present a certificate
  with --tokens also:
  cluster-token               a random cluster token (--cluster-token-file)
  api-keys                    one admin and one user key (--api-keys); the client's --api-key is a key from it

gRPC checks the server's name: every address a peer dials (a neuron's --advertise host, cortex's
host as the neurons' --cortex names it) must be among the names, so give each with --host. One
certificate for the whole fleet is for development; in production issue one per host from your CA.
Keys are written mode 0600: a container that runs as another user needs them readable (chown).
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - the dev extra installs it
    sys.exit("make_dev_certs.py needs the `cryptography` package: pip install -e '.[dev]'")

DAYS = 365
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cortex-neuron dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=DAYS)))


def make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = _name("cortex-neuron dev CA")
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(ca: x509.Certificate, ca_key, common_name: str, names: list[str], server: bool
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    builder = (_builder(_name(common_name), ca.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(path: Path, data: bytes, private: bool) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_dev_certs(out: Path, hosts: list[str] = (), tokens: bool = False) -> dict[str, Path]:
    """Write the files (see the module docstring); returns {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca()
    node, node_key = make_leaf(ca, ca_key, "cortex-neuron node", [*DEFAULT_NAMES, *hosts], server=True)
    client, client_key = make_leaf(ca, ca_key, "cortex-neuron client", [], server=False)
    files = {"ca.pem": (_pem(ca), False), "ca-key.pem": (_key_pem(ca_key), True),
             "node.pem": (_pem(node), False), "node-key.pem": (_key_pem(node_key), True),
             "client.pem": (_pem(client), False), "client-key.pem": (_key_pem(client_key), True)}
    if tokens:
        files["cluster-token"] = (secrets.token_hex(32).encode() + b"\n", True)
        files["api-keys"] = (f"# KEY ROLE (admin: everything; user: Generate, Forward, ListModels)\n"
                             f"{secrets.token_hex(24)} admin\n{secrets.token_hex(24)} user\n".encode(), True)
    for name, (data, private) in files.items():
        _write(out / name, data, private)
    return {name: out / name for name in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write into (created)")
    parser.add_argument("--host", action="append", default=[],
                        help="a DNS name or IP the node certificate must carry (repeatable): every neuron's "
                             "advertised host and cortex's host")
    parser.add_argument("--tokens", action="store_true", help="also write a cluster token and an API key file")
    args = parser.parse_args(argv)
    files = make_dev_certs(args.out, args.host, args.tokens)
    print(f"wrote {', '.join(files)} to {args.out} (node certificate names: "
          f"{', '.join(dict.fromkeys([*DEFAULT_NAMES, *args.host]))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
