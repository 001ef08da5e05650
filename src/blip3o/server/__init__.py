"""An OpenAI-compatible HTTP server for a Blip3o model, with a web page.

    service = Blip3oService(model, "debug", ServerConfig())   # owns the model and the micro-batcher
    app = create_app(service)                                  # FastAPI: routes only parse and delegate
    serve(app, listen_socket("127.0.0.1", 8000))               # uvicorn, in the foreground
    with BackgroundServer(app) as server: ...                  # uvicorn in a thread, on a free port
"""

from __future__ import annotations

import contextlib
import socket
import threading

from blip3o.server.app import create_app
from blip3o.server.config import ServerConfig
from blip3o.server.service import Blip3oService

__all__ = ["BackgroundServer", "Blip3oService", "ServerConfig", "create_app", "listen_socket", "serve"]


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), as uvicorn binds one; OSError if it cannot be (the port in use,
    an address not of this host) and OverflowError for a port outside 0..65535."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def uvicorn_config(app, log_level: str):
    """uvicorn's settings for `app`, with the connection limits of its service's ServerConfig."""
    import uvicorn

    c: ServerConfig = app.state.service.config
    return uvicorn.Config(app, log_level=log_level, http="h11", timeout_keep_alive=c.keep_alive_s,
                          limit_concurrency=c.max_connections, h11_max_incomplete_event_size=c.max_header_bytes)


def serve(app, sock: socket.socket, log_level: str = "info") -> None:
    """Run `app` with uvicorn on the bound socket `sock` (`listen_socket`) until Ctrl-C or SIGTERM, then return:
    stopping is how a server ends, as `uvicorn.run` treats it (uvicorn re-raises the signal after its graceful
    shutdown)."""
    import uvicorn

    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(uvicorn_config(app, log_level)).run(sockets=[sock])


class BackgroundServer:
    """uvicorn serving `app` from a thread, on `port` (0: a free one); `url` once entered."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.host = host
        self._socket = listen_socket(host, port)  # bound here, so the port is known and cannot be taken meanwhile
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(uvicorn_config(app, log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        for _ in range(600):
            if self._server.started:
                return self
            if not self._thread.is_alive():
                break
            threading.Event().wait(0.05)
        self.__exit__()
        raise RuntimeError(f"the server at {self.url} did not start")

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._socket.close()
