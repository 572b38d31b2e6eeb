"""An HTTP protocol for uvicorn that closes connections whose request headers never complete.

uvicorn times out idle keep-alive connections but not a request whose headers arrive a byte at a time
(slowloris): each such connection would be held forever. This wraps uvicorn's own protocol class (httptools
when installed, else h11) and closes a connection on which no new request has started, and no response
is in flight, for ``timeout_s``.
"""
from __future__ import annotations

DEFAULT_HEADER_TIMEOUT_S = 10.0


def protocol_class(timeout_s: float = DEFAULT_HEADER_TIMEOUT_S):
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeaderTimeoutProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watched_cycle = self.cycle
            self._header_timer = self.loop.call_later(timeout_s, self._check_headers)

        def _check_headers(self) -> None:
            cycle = self.cycle
            idle = cycle is None or cycle.response_complete
            if idle and cycle is self._watched_cycle and not self.transport.is_closing():
                self.transport.close()  # no request began in timeout_s: its headers never completed
                return
            self._watched_cycle = cycle
            self._header_timer = self.loop.call_later(timeout_s, self._check_headers)

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
