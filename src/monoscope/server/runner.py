"""Run the application with uvicorn: in the foreground (`serve`) or on a background thread (`ServerThread`, for
tests, benchmarks and notebooks). The listening socket is bound first, so a busy port fails with a clear
message and port 0 picks a free one."""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Callable

from starlette.types import ASGIApp

from ..errors import MonoscopeError

if TYPE_CHECKING:
    import uvicorn


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise MonoscopeError(
            f"cannot resolve host {host!r} ({err}); pass --host 127.0.0.1 or an address of this machine"
        ) from err
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise MonoscopeError(
            f"cannot listen on {host}:{port} ({err.strerror or err}); choose another port with --port"
        ) from err
    sock.set_inheritable(True)
    return sock


def _config(app: ASGIApp, log_level: str) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=log_level in ("debug", "info"),
        lifespan="off",
        timeout_graceful_shutdown=2,
        ws="none",
    )


def serve_forever(
    app: ASGIApp, host: str, port: int, log_level: str = "warning", on_ready: Callable[[int], None] | None = None
) -> None:
    """Serve `app` on host:port until Ctrl-C."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(_config(app, log_level))
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    server.run(sockets=[sock])


class ServerThread:
    """uvicorn on a daemon thread: `with ServerThread(app) as s: urllib.request.urlopen(s.url + "/health")`."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.sock = bind(host, port)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.server = uvicorn.Server(_config(app, log_level))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="monoscope-server", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
