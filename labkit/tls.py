"""A TLS front door for the embedded broker, so that ``rediss://`` works with no real Redis.

    with EmbeddedBroker(tls=server_context) as broker:     # broker.tls_url: rediss://127.0.0.1:PORT/0
        ...

It listens on a port of its own, takes each TLS connection and relays it, as
plain bytes, to the broker's ordinary port. One thread per connection does all
of that connection's TLS work through an ``ssl.SSLObject`` over memory buffers:
an SSL connection must not be read and written from two threads at once, and
this way it never is. ``certificates()`` makes a throwaway CA and a certificate
for 127.0.0.1 with ``trustme``, as the course's tests and ``--tls`` do.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from pathlib import Path

_CHUNK = 65536


class TLSFrontDoor:
    """Accept TLS on ``host``:a free port and relay each connection to ``upstream_port``."""

    def __init__(self, context: ssl.SSLContext, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.context = context
        self.upstream = (host, upstream_port)
        self._listener = socket.create_server((host, 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, name="labkit-tls-accept", daemon=True)

    def start(self) -> TLSFrontDoor:
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: stop() was called
            thread = threading.Thread(target=self._relay, args=(client,), name="labkit-tls-relay", daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket) -> None:
        """Decrypt what the client sends to the broker, encrypt what the broker answers."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets.update((client, upstream))
        handshaken = False
        try:
            while not self._stopping.is_set():
                readable, _, _ = select.select([client, upstream], [], [], 0.5)
                if client in readable:
                    data = client.recv(_CHUNK)
                    if not data:
                        return
                    incoming.write(data)
                    if not handshaken:
                        try:
                            tls.do_handshake()
                            handshaken = True
                        except ssl.SSLWantReadError:
                            pass
                    if handshaken:
                        upstream.sendall(_read_all(tls))
                if upstream in readable and handshaken:
                    data = upstream.recv(_CHUNK)
                    if not data:
                        return
                    tls.write(data)
                if outgoing.pending:
                    client.sendall(outgoing.read())
        except (OSError, ssl.SSLError):
            return  # the client hung up, or spoke no TLS: drop this connection only
        finally:
            with self._lock:
                self._sockets.difference_update((client, upstream))
            client.close()
            upstream.close()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in flight; close() alone does not
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(5)
        for thread in threads:
            thread.join(5)


def _read_all(tls: ssl.SSLObject) -> bytes:
    """Every decrypted byte available now."""
    chunks = []
    while True:
        try:
            chunk = tls.read(_CHUNK)
        except ssl.SSLWantReadError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def certificates(folder: Path, host: str = "127.0.0.1") -> tuple[ssl.SSLContext, Path]:
    """A throwaway CA and a server certificate for ``host``: (the server's context, the CA file for clients)."""
    import trustme

    authority = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(host).configure_cert(server)
    ca_file = folder / "labkit-ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    return server, ca_file
