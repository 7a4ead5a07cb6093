"""The HTTP protocol `loragate serve` runs: uvicorn's h11 implementation with a deadline on each
request head. h11 rather than httptools (uvicorn's pick when both are installed) because only
h11 bounds the head's size (`h11_max_incomplete_event_size`); httptools buffers headers of any
size.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def head_timeout_h11_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on each request head, which uvicorn lacks: its
    keep-alive timer starts only after a response and any byte cancels it, so without this a
    connection that never sends a request, or sends its headers a byte at a time, is held
    forever. Past the deadline the connection is closed, with no answer and no log line (a
    flood of them would flood the log)."""

    class HeadTimeoutH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            # The deadline runs from the first byte of a request after a response; the idle time
            # before it is uvicorn's keep-alive timeout.
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._arm_head_timer()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in (or the request refused)
                self._cancel_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutH11Protocol
