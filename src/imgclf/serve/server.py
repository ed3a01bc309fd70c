"""uvicorn's server, with a drain: on the first SIGTERM/SIGINT new requests are answered 503 for
``drain_seconds`` while the ones in flight finish, then uvicorn shuts down as it does (waiting for
what is left, up to its graceful timeout)."""

from __future__ import annotations

import threading

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state  # the app's state: draining, limits

    def handle_exit(self, sig, frame) -> None:
        drain = self.state.limits.drain_seconds
        if self.state.draining or drain <= 0:
            return super().handle_exit(sig, frame)
        self.state.draining = True
        timer = threading.Timer(drain, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()
