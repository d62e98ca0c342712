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

From a terminal, ``python -m labkit.smtp --port 1025 --refuse 2`` runs one
until Ctrl-C and prints each message it is offered.
"""

from __future__ import annotations

import argparse
import threading
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Callable

from aiosmtpd.controller import Controller

REPLIES = {
    421: "421 4.3.2 Service shutting down, try again later",
    450: "450 4.2.1 Mailbox busy, try again later",
    451: "451 4.7.1 Greylisted, try again later",
    550: "550 5.1.1 No such user here",
    554: "554 5.7.1 Message rejected",
}


class _Controller(Controller):
    """aiosmtpd's Controller, made to work on port 0: it pings its own server, so learn the port first."""

    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SMTPServer:
    """An SMTP server on 127.0.0.1 that refuses the first ``refuse`` messages with ``code``."""

    def __init__(
        self, refuse: int | None = 0, code: int = 451, port: int = 0, log: Callable[[str], None] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._controller: _Controller | None = None
        self._log = log
        self.host = "127.0.0.1"
        self.port = port
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
            attempt = len(self._attempts)
            refused = self._refuse is None or attempt <= self._refuse
            reply = REPLIES[self._code] if refused else "250 2.0.0 OK: queued"
            if not refused:
                self._delivered.append(message_from_bytes(envelope.content, policy=policy.default))
        if self._log:
            self._log(f"attempt {attempt}: mail to {', '.join(envelope.rcpt_tos)} -> {reply}")
        return reply

    def start(self) -> SMTPServer:
        controller = _Controller(self, hostname=self.host, port=self.port, ready_timeout=10)
        try:
            controller.start()
        except BaseException:  # a port in use, a slow start: leave no thread or loop behind
            controller.stop(no_assert=True)
            if not controller.loop.is_closed():
                controller.loop.close()
            raise
        self._controller, self.port = controller, controller.port
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SMTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labkit.smtp", description="A test SMTP server that can refuse.")
    parser.add_argument("--port", type=int, default=1025, help="port on 127.0.0.1 (default 1025)")
    parser.add_argument("--refuse", type=int, default=0, help="refuse this many messages first (default 0)")
    parser.add_argument("--code", type=int, default=451, choices=sorted(REPLIES), help="the refusal (default 451)")
    args = parser.parse_args(argv)
    with SMTPServer(args.refuse, args.code, port=args.port, log=lambda line: print(line, flush=True)) as server:
        rule = f"refusing the first {args.refuse} with {args.code}" if args.refuse else "accepting every message"
        print(f"SMTP server on {server.host}:{server.port}, {rule}. Ctrl-C stops it.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
