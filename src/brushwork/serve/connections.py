"""Connection limits uvicorn does not set: a deadline for a request's headers (slowloris holds connections
open by sending them a byte at a time; uvicorn times out only idle keep-alive connections), and the size of a
request head h11 reads whole (so that app.HeaderLimit can answer 431 where h11 alone gives up mid-send)."""

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_SECONDS = 10.0  # time a client has to send a request's line and headers
MAX_HEADER_BYTES = 32 * 1024  # headers larger than this get 431
# h11 reads a request head up to this size before it gives up with 400; above MAX_HEADER_BYTES so that a
# large head is read whole and answered 431, below what 300 slow connections could make expensive.
H11_MAX_HEAD_BYTES = 256 * 1024


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers: a connection that has not sent a whole
    request line and headers within `header_seconds` of connecting (or of its previous response) is closed."""

    header_seconds = HEADER_SECONDS

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_seconds, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        # IDLE: no whole request head since the deadline was armed (a request being served has left IDLE)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
