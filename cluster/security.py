"""Who can reach the cluster: listen addresses, address checks, TLS certificates.

Dask's trust model is simple: whoever can open a connection to a scheduler, worker or
nanny port can run any Python code there. So the embedded cluster listens on 127.0.0.1,
every process that listens beyond loopback without TLS says so once at start, and
``aicluster certs`` makes the CA and per-PC key pairs that ``security.tls: true`` needs
(mutual TLS through ``distributed.security.Security``; the dashboard is served over
HTTPS with the same certificate, through Dask's ``distributed.scheduler.dashboard.tls``).
"""
from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["AddressError", "check_address", "is_loopback", "warn_if_open", "listen_addresses", "make_certs", "OPEN_WARNING"]

logger = logging.getLogger("cluster.security")

#: the one line a process prints when it listens beyond loopback without TLS
OPEN_WARNING = ("{what}: listening on {where} without TLS; anyone who can reach these ports can run code on "
                "this machine (see the README's Security section)")
#: ... when only its HTTP server (dashboard, /metrics) is open: readable, not a way in
OPEN_HTTP_WARNING = ("{what}: serving HTTP on {where} without TLS; anyone on the network can read its dashboard "
                     "and metrics (see the README's Security section)")


class AddressError(ValueError):
    """A scheduler address that cannot work; the message says why and what to write instead."""


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for all interfaces ('' or 0.0.0.0)."""
    if not host:
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(what: str, addresses: list[str]) -> str | None:
    """Log one warning line when any of ``addresses`` (``tcp://``, ``tls://``, ``http://``,
    ``https://``) is reachable beyond this machine without TLS; returns the line (None when
    all are loopback or encrypted)."""
    open_ = []
    for a in addresses:
        if a.startswith(("tls://", "https://", "inproc://")):
            continue
        host = _host_of(a)
        if not is_loopback(host):
            open_.append((a, f"{a} (every interface)" if host in ("", "0.0.0.0", "::") else a))
    if not open_:
        return None
    comm = any(not a.startswith("http") for a, _ in open_)
    line = (OPEN_WARNING if comm else OPEN_HTTP_WARNING).format(what=what, where=" and ".join(w for _, w in open_))
    logger.warning(line)
    return line


def listen_addresses(server) -> list[str]:
    """Where ``server`` (a Dask scheduler, worker or nanny) accepts connections: its comm
    listeners and its HTTP server (dashboard, /metrics)."""
    out = [lst.listen_address for lst in getattr(server, "listeners", [])]
    http = getattr(server, "http_server", None)
    if http is not None:
        from distributed.comm.addressing import unparse_host_port
        from distributed.comm.utils import get_tcp_server_addresses

        scheme = "https" if getattr(http, "ssl_options", None) else "http"
        for host, port, *_ in get_tcp_server_addresses(http):
            out.append(f"{scheme}://{unparse_host_port(host, port)}")
    return out


def _host_of(address: str) -> str:
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):
        return rest[1:rest.index("]")]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def check_address(address: str, tls: bool, config_name: str = "config.yaml", resolve: bool = True) -> str:
    """``address`` as Dask wants it (``tcp://HOST:PORT`` or ``tls://HOST:PORT``), or
    ``AddressError`` with a message that names the problem and the fix.

    A bare ``HOST:PORT`` gets the scheme that ``tls`` implies. With ``resolve``, a host name
    that does not resolve is an error too (Dask would retry it until its timeout).
    """
    if not isinstance(address, str) or not address.strip():
        raise AddressError("the scheduler address is empty; use tcp://HOST:8786 (tls://HOST:8786 with TLS)")
    address = address.strip()
    scheme = "tls" if tls else "tcp"
    if address.startswith("inproc://"):
        return address
    if "://" not in address:
        address = f"{scheme}://{address}"
    parts = urlsplit(address)
    given = parts.scheme.lower()
    example = f"{scheme}://{parts.hostname or 'HOST'}:{parts.port if _port(parts) else 8786}"
    if given in ("http", "https"):
        raise AddressError(f"{address!r} is a web address; the scheduler speaks Dask's protocol: use {example} "
                           "(the dashboard's http port is not the scheduler's port)")
    if given not in ("tcp", "tls"):
        raise AddressError(f"{address!r}: the scheme {given + '://'!r} is not supported; use {example}")
    if given == "tls" and not tls:
        raise AddressError(f"{address!r} is a TLS address but security.tls is false in {config_name}; set "
                           "security.tls: true with certificates (see `aicluster certs --help`), or use "
                           f"tcp://{parts.netloc}")
    if given == "tcp" and tls:
        raise AddressError(f"{address!r} is a plain TCP address but security.tls is true in {config_name}; "
                           f"use tls://{parts.netloc}")
    if not parts.hostname:
        raise AddressError(f"{address!r} has no host; use {example}")
    if not _port(parts):
        raise AddressError(f"{address!r} has no port; the scheduler listens on 8786 by default: "
                           f"{given}://{parts.netloc.rstrip(':')}:8786")
    if parts.path not in ("", "/") or parts.query:
        raise AddressError(f"{address!r}: a scheduler address is only {given}://HOST:PORT")
    if resolve:
        try:
            socket.getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise AddressError(f"{address!r}: the host name {parts.hostname!r} does not resolve ({e.strerror}); "
                               "check the name, or use the scheduler's IP address") from None
    return f"{given}://{parts.netloc}"


def _port(parts) -> int | None:
    try:
        return parts.port
    except ValueError:  # "host:abc"
        return None


# -- certificates --------------------------------------------------------------------------
def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Replace ``path`` in one step; a key is readable by its owner only from its first byte."""
    from .files import atomic_write

    with atomic_write(path, private=private) as f:
        f.write(data)


def _parse_host(item: str) -> tuple[str, list[str]]:
    """``"pc1=192.168.1.10"`` -> ("pc1", ["pc1", "192.168.1.10"]); ``"pc2"`` -> ("pc2", ["pc2"])."""
    name, _, extra = item.partition("=")
    name = name.strip()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{item!r} is not a host name (e.g. pc1 or pc1=192.168.1.10)")
    alts = [name] + [a.strip() for a in extra.split("/") if a.strip()]
    return name, alts


def make_certs(folder: str | os.PathLike, hosts: list[str], days: int = 825, force: bool = False) -> dict:
    """A CA (``ca.pem``, ``ca.key``) and a key pair per host (``<host>.pem``, ``<host>.key``).

    An existing CA in ``folder`` is reused, so a PC added later gets a certificate the
    others trust. Each certificate names its host (DNS name or IP) plus ``localhost`` and
    127.0.0.1 (for browsers on that PC), and is good for both ends of a connection (Dask
    authenticates both). Returns ``{"ca": path, "hosts": {name: (cert, key)}}``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("name at least one host, e.g. --hosts pc1,pc2,192.168.1.10")
    parsed = [_parse_host(h) for h in hosts]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not force:
        taken = [str(folder / f"{n}.pem") for n, _ in parsed if (folder / f"{n}.pem").exists()]
        if taken:
            raise FileExistsError(f"{', '.join(taken)} already exist(s); pass --force to replace")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert_path, ca_key_path = folder / "ca.pem", folder / "ca.key"
    pem = serialization.Encoding.PEM
    if ca_cert_path.exists() != ca_key_path.exists():
        have, missing = (ca_cert_path, ca_key_path) if ca_cert_path.exists() else (ca_key_path, ca_cert_path)
        raise FileExistsError(f"{have} exists but {missing} does not: a new CA would not be trusted by the PCs that "
                              f"trust the old one. Run this on the PC that keeps {ca_key_path.name}, or use another folder")
    if ca_cert_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if ca_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                ca_cert.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise ValueError(f"{ca_key_path} is not the key of {ca_cert_path}")
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-ai-cluster CA")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write(ca_key_path, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
               private=True)
        _write(ca_cert_path, ca_cert.public_bytes(pem))
    out: dict = {"ca": str(ca_cert_path), "ca_key": str(ca_key_path), "hosts": {}}
    for name, alts in parsed:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list = []
        for a in [*alts, "localhost", "127.0.0.1"]:
            try:
                entry = x509.IPAddress(ipaddress.ip_address(a))
            except ValueError:
                entry = x509.DNSName(a)
            if entry not in sans:
                sans.append(entry)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
        _write(key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
               private=True)
        _write(cert_path, cert.public_bytes(pem))
        out["hosts"][name] = (str(cert_path), str(key_path))
    return out
