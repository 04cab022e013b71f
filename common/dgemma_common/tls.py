"""TLS from PEM files, for every server and client of dgemma: grpc's and the ssl module's own TLS, with
certificates re-read when their files change (cert-manager renews a Secret, the kubelet swaps the mounted
files, and new connections present the new certificate without a restart).

A certificate and its key change in two files, not at once: a pair is taken only when the key matches the
certificate (checked by loading them into a throwaway `ssl` context); until then the old pair stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

# How often a server's HTTPS context looks at its files (gRPC servers look on every new connection).
DEFAULT_RELOAD_S = 10.0


@dataclass(frozen=True)
class TlsFiles:
    """A certificate (chain) and its key, and optionally the CA of the other side.

    On a server the CA makes client certificates required (mutual TLS); on a client it is what the
    server's certificate must chain to (without it, the system's trust store).
    """

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None


@dataclass(frozen=True)
class Material:
    """The bytes of one consistent read of a TlsFiles."""

    cert: bytes
    key: bytes
    ca: bytes | None


def add_certificate_flags(add: Callable[..., None], serves: str) -> None:
    """`--tls-cert-file` and `--tls-key-file`, as every dgemma server takes them (`add(flag, dest, help, **kw)`)."""
    add("--tls-cert-file", "tls_cert_file", f"serve {serves} over TLS with this PEM certificate (chain); re-read "
        "when it changes", type=Path)
    add("--tls-key-file", "tls_key_file", "the PEM key of --tls-cert-file", type=Path)


def tls_files(cert: Path | None, key: Path | None, ca: Path | None = None, what: str = "TLS") -> TlsFiles | None:
    """Files from optional flags: both or neither of cert and key; a CA alone is an error."""
    if cert is None and key is None:
        if ca is not None:
            raise ValueError(f"{what}: a CA file needs a certificate and key file too")
        return None
    if cert is None or key is None:
        raise ValueError(f"{what}: give both the certificate and the key file")
    return TlsFiles(Path(cert), Path(key), None if ca is None else Path(ca))


class ReloadingFiles:
    """The current material of a TlsFiles; `refresh()` takes a changed, valid pair and says whether it did."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._signature = self._stat()
        self.material = self._read_valid()
        self.version = 0

    def _paths(self) -> Sequence[Path]:
        f = self.files
        return (f.cert_file, f.key_file) if f.ca_file is None else (f.cert_file, f.key_file, f.ca_file)

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        # os.stat follows the kubelet's ..data symlink, so a swapped Secret volume shows as a new inode.
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in (os.stat(p) for p in self._paths()))

    def _read(self) -> Material:
        f = self.files
        return Material(f.cert_file.read_bytes(), f.key_file.read_bytes(),
                        None if f.ca_file is None else f.ca_file.read_bytes())

    def _read_valid(self) -> Material:
        """Read, check that the key matches the certificate, and read again: the files did not move meanwhile."""
        before = self._read()
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        check.load_cert_chain(self.files.cert_file, self.files.key_file)
        if self.files.ca_file is not None:
            check.load_verify_locations(cafile=self.files.ca_file)
        if self._read() != before:
            raise ssl.SSLError("the certificate files changed while they were read")
        return before

    def refresh(self) -> bool:
        """Take the files' new content if they changed and hold a valid pair; True when it was taken."""
        try:
            signature = self._stat()
            if signature == self._signature:
                return False
            material = self._read_valid()
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Half-written (a new certificate, the old key): keep serving the old pair, look again later.
            log.warning("TLS files %s changed but cannot be used yet: %s", self.files.cert_file, exc)
            return False
        self._signature = signature
        self.material = material
        self.version += 1
        log.info("TLS certificate %s reloaded", self.files.cert_file)
        return True


# ---- gRPC ------------------------------------------------------------------------------------------


def _grpc_config(m: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], root_certificates=m.ca)


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials whose certificate follows its files; a CA file makes client certificates required."""
    current = ReloadingFiles(files)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # grpc calls this on every new connection: None keeps the configuration it has.
        return _grpc_config(current.material) if current.refresh() else None

    return grpc.dynamic_ssl_server_credentials(
        _grpc_config(current.material), fetch, require_client_authentication=files.ca_file is not None)


def grpc_channel_credentials(files: TlsFiles | None, ca_file: Path | None = None) -> grpc.ChannelCredentials:
    """Client credentials: our certificate (mutual TLS) if files are given, and the CA the server must chain to."""
    ca_path = files.ca_file if files is not None and files.ca_file is not None else ca_file
    ca = ca_path.read_bytes() if ca_path is not None else None
    if files is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    m = ReloadingFiles(files).material
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=m.key, certificate_chain=m.cert)


# ---- HTTPS (ssl module) ------------------------------------------------------------------------------


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """An HTTPS server context (TLS 1.2+); a CA file makes client certificates required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert_file, files.key_file)
    if files.ca_file is not None:
        ctx.load_verify_locations(cafile=files.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def keep_reloaded(ctx: ssl.SSLContext, files: TlsFiles, interval_s: float = DEFAULT_RELOAD_S) -> None:
    """Until cancelled: when the files change to a valid pair, load it into the live context.

    New handshakes copy the context's certificate, so connections opened after the reload present the
    new one and open connections keep theirs.
    """
    current = ReloadingFiles(files)
    while True:
        await asyncio.sleep(interval_s)
        if not current.refresh():
            continue
        try:
            ctx.load_cert_chain(files.cert_file, files.key_file)
            if files.ca_file is not None:
                ctx.load_verify_locations(cafile=files.ca_file)
        except (OSError, ssl.SSLError) as exc:  # the files moved again since refresh(): the next look fixes it
            log.warning("TLS files %s could not be loaded: %s", files.cert_file, exc)
