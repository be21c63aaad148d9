"""Serving an aiohttp application on loopback, on a given or a free port, and stopping it again."""

from __future__ import annotations

import socket

from aiohttp import web

LOOPBACK = "127.0.0.1"


def bind(host: str = LOOPBACK, port: int = 0) -> socket.socket:
    """A listening TCP socket (port 0: a free one), so the caller knows the port before serving."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Server:
    """An application served on one socket: ``await start()``, ``url``, ``await stop()``."""

    def __init__(self, app: web.Application, host: str = LOOPBACK, port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        sock = bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
