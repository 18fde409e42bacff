"""An aiohttp application of its own, with Realtime Lab's transports mounted under ``/live``.

Run it: ``.venv/bin/python examples/mounted.py`` (port 8090), then
``curl -N localhost:8090/live/sse/news`` in one shell and
``curl -X POST localhost:8090/notify -d 'the build is green'`` in another.
"""

from __future__ import annotations

from aiohttp import web

from realtime_lab.app import mount_transports
from realtime_lab.config import Settings
from realtime_lab.transports.keys import BUS_KEY

NEWS = "news"


async def hello(request: web.Request) -> web.Response:
    """A route of the application's own."""
    return web.json_response({"hello": "from the host application"})


async def notify(request: web.Request) -> web.Response:
    """The application publishes; every client of ``/live/*/news`` gets it, on any transport."""
    text = (await request.text())[:500]
    event = await request.app[BUS_KEY].publish(NEWS, "notice", {"text": text})
    return web.json_response(event.to_dict(), status=201)


def make_app(settings: Settings | None = None) -> web.Application:
    """The host application: its own routes, and the transports under ``/live``."""
    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_post("/notify", notify)
    mount_transports(app, settings or Settings(ticker_rate=0), prefix="/live")
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=8090)
