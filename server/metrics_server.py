"""The Prometheus listener: one app's registry on its own address, apart from the public port.

Its series name every tenant and adapter and it asks for no key, so it listens where only the
scraper should reach (loopback by default). It is prometheus_client's own server in a daemon
thread, not a route of the gateway: a scrape still answers while the event loop is saturated or
stuck, which is when the numbers matter most, and binding is synchronous, so a taken port fails
`loragate serve` before the engine is started.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from server.settings import MetricsSettings

logger = logging.getLogger(__name__)


class MetricsListenerError(RuntimeError):
    """The metrics listener could not bind its address."""


@dataclass
class MetricsListener:
    server: WSGIServer
    thread: threading.Thread
    host: str

    @property
    def port(self) -> int:
        return self.server.server_port  # the bound one, also when 0 was asked for

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()  # waits for serve_forever to return
        self.server.server_close()
        self.thread.join(5)


def start_metrics_listener(
    registry: CollectorRegistry, settings: MetricsSettings
) -> MetricsListener:
    """Serve `registry` on `settings.host`:`settings.port` (0: a free port) from a daemon thread."""
    try:
        server, thread = start_http_server(settings.port, settings.host, registry=registry)
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise MetricsListenerError(
            f"cannot listen for metrics on {settings.host}:{settings.port}: {e.strerror or e} "
            "(set LORAGATE_METRICS__HOST / LORAGATE_METRICS__PORT)"
        ) from e
    listener = MetricsListener(server, thread, settings.host)
    logger.info("metrics on %s", listener.url)
    return listener
