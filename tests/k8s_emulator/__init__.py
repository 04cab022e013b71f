"""A Kubernetes API server emulator for tests: real HTTP on 127.0.0.1, kubeconfig for real clients.

async with KubernetesEmulator(tmp_path) as k8s:      # in an event loop
    subprocess.run(["kubectl", "--kubeconfig", k8s.kubeconfig, "get", "ns"])

with EmulatorThread(tmp_path) as k8s:                 # from synchronous tests: runs its own loop
    ...

With `tls=True` it serves HTTPS with a certificate from its own test CA (`ca`, tests/tls/certs.py; its
certificate is `ca_file` and in the kubeconfig), as a real API server does: the in-cluster client
configuration insists on https.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import pathlib
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp.test_utils
import kmock
import yaml

from tests.k8s_emulator.api import ApiError, Handler, Store
from tests.tls.certs import CA

__all__ = ["ApiError", "EmulatorThread", "Handler", "KubernetesEmulator", "Store"]

T = TypeVar("T")


def _tls_server(context: ssl.SSLContext) -> type[aiohttp.test_utils.RawTestServer]:
    """kmock's test server class, listening with TLS."""

    class TlsTestServer(aiohttp.test_utils.RawTestServer):
        async def start_server(self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
            await super().start_server(loop, ssl=context, **kwargs)

    return TlsTestServer


class KubernetesEmulator:
    """The API server as an async context manager; `kubeconfig` is a file for kubectl and clients."""

    def __init__(self, directory: pathlib.Path | str, record: bool = True, tls: bool = False) -> None:
        self.directory = pathlib.Path(directory)
        self.handler = Handler(record=record)
        self.ca = CA(self.directory / "ca", "k8s emulator CA") if tls else None
        if self.ca is None:
            self._server = kmock.Server(self.handler)
        else:
            served = self.ca.issue("kube-apiserver")  # localhost and 127.0.0.1
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(served.cert, served.key)
            self._server = kmock.Server(self.handler, server_cls=_tls_server(context))
        self.kubeconfig = str(self.directory / "kubeconfig")
        self.ca_file = "" if self.ca is None else str(self.ca.path)

    @property
    def store(self) -> Store:
        return self.handler.store

    @property
    def url(self) -> str:
        scheme = "http" if self.ca is None else "https"
        return f"{scheme}://127.0.0.1:{self._server.port}"

    async def __aenter__(self) -> Self:
        # One access-log line per request drowns test output and slows the server down.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        await self.handler.__aenter__()
        await self._server.__aenter__()
        self.directory.mkdir(parents=True, exist_ok=True)
        pathlib.Path(self.kubeconfig).write_text(yaml.safe_dump(self.kubeconfig_dict()))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.store.close_watches()
        await asyncio.sleep(0.05)  # let open watches end their streams before the server closes
        await self._server.__aexit__(exc_type, exc, tb)
        await self.handler.__aexit__(exc_type, exc, tb)

    def kubeconfig_dict(self, user: dict[str, Any] | None = None) -> dict[str, Any]:
        """A kubeconfig for this server; `user`: other credentials than the token `emulator`."""
        cluster: dict[str, Any] = {"server": self.url}
        if self.ca is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca.pem).decode()
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": cluster}],
            "users": [{"name": "tester", "user": user or {"token": "emulator"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": "default"},
                }
            ],
        }


class EmulatorThread:
    """The emulator on its own event loop in a thread, so synchronous tests and clients can block freely."""

    def __init__(self, directory: pathlib.Path | str, record: bool = True, tls: bool = False) -> None:
        self.emulator = KubernetesEmulator(directory, record=record, tls=tls)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="k8s-emulator", daemon=True)

    @property
    def kubeconfig(self) -> str:
        return self.emulator.kubeconfig

    @property
    def url(self) -> str:
        return self.emulator.url

    @property
    def store(self) -> Store:
        return self.emulator.store

    @property
    def ca(self) -> CA | None:
        return self.emulator.ca

    @property
    def ca_file(self) -> str:
        return self.emulator.ca_file

    def kubeconfig_dict(self, user: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.emulator.kubeconfig_dict(user)

    def authorizations(self) -> list[str]:
        """The Authorization header of every request so far (empty where none), in order."""
        return self.call(lambda: [r.headers.get("Authorization", "") for r in self.handler])

    @property
    def handler(self) -> Handler:
        return self.emulator.handler

    def call(self, fn: Callable[[], T]) -> T:
        """Run a function on the emulator's loop (where the store lives) and return its result."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T], timeout: float = 30) -> T:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def __enter__(self) -> Self:
        self._thread.start()
        self.run(self.emulator.__aenter__())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.run(self.emulator.__aexit__(exc_type, exc, tb))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the emulator; raises with kubectl's stderr when `check` and it fails."""
        return kubectl(
            self.kubeconfig,
            args,
            input=input,
            check=check,
            timeout=timeout,
            cache_dir=str(self.emulator.directory / "kubectl-cache"),
        )


def kubectl(
    kubeconfig: str,
    args: Sequence[str],
    input: str | None = None,
    check: bool = True,
    timeout: float = 30,
    cache_dir: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run kubectl with a given kubeconfig."""
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    command = ["kubectl", *args] if cache_dir is None else ["kubectl", f"--cache-dir={cache_dir}", *args]
    result = subprocess.run(command, input=input, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result
