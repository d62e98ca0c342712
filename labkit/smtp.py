"""A test SMTP server that can say "not now" or "no": for checks and notebooks on retries.

    with SMTPServer(refuse=2, code=451) as server:     # 127.0.0.1, a free port
        os.environ["SMTP_PORT"] = str(server.port)
        ...                                            # code under test sends mail
        server.attempts    # time.monotonic() of each message the server was offered
        server.delivered   # the messages it accepted, as email.message.EmailMessage

It refuses the first ``refuse`` messages with ``code`` (451: try again later;
550: never) at the DATA step, which smtplib reports as ``SMTPDataError``, then
accepts the rest. ``refuse=None`` refuses every message. ``reset(...)`` clears
the records and sets a new rule, so one server can serve several demos.
"""

from __future__ import annotations

import threading
import time
from email import message_from_bytes, policy
from email.message import EmailMessage

from aiosmtpd.controller import Controller

REPLIES = {
    421: "421 4.3.2 Service shutting down, try again later",
    450: "450 4.2.1 Mailbox busy, try again later",
    451: "451 4.7.1 Greylisted, try again later",
    550: "550 5.1.1 No such user here",
    554: "554 5.7.1 Message rejected",
}


class _Controller(Controller):
    """aiosmtpd's Controller on port 0: it pings its server on ``self.port``, so learn it first."""

    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SMTPServer:
    """An SMTP server on 127.0.0.1 that refuses the first ``refuse`` messages with ``code``."""

    def __init__(self, refuse: int | None = 0, code: int = 451) -> None:
        self._lock = threading.Lock()
        self._controller: _Controller | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.reset(refuse, code)

    def reset(self, refuse: int | None = 0, code: int = 451) -> None:
        """Forget what happened so far, and refuse the next ``refuse`` messages with ``code``."""
        if code not in REPLIES:
            raise ValueError(f"code must be one of {sorted(REPLIES)}")
        with self._lock:
            self._refuse, self._code = refuse, code
            self._attempts: list[float] = []
            self._delivered: list[EmailMessage] = []

    @property
    def attempts(self) -> list[float]:
        """When each message was offered (``time.monotonic()``), refused or not."""
        with self._lock:
            return list(self._attempts)

    @property
    def delivered(self) -> list[EmailMessage]:
        """The messages accepted, in order."""
        with self._lock:
            return list(self._delivered)

    async def handle_DATA(self, server, session, envelope) -> str:  # called by aiosmtpd
        with self._lock:
            self._attempts.append(time.monotonic())
            if self._refuse is None or len(self._attempts) <= self._refuse:
                return REPLIES[self._code]
            self._delivered.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 2.0.0 OK: queued"

    def start(self) -> SMTPServer:
        self._controller = _Controller(self, hostname=self.host, port=0, ready_timeout=10)
        self._controller.start()
        self.port = self._controller.port
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SMTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
