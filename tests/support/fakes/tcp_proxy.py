"""A TCP proxy on 127.0.0.1 that a test can cut and restore: a broker outage without touching
the broker (the machine's RabbitMQ is shared; it is never stopped or reconfigured by a test).

    with TcpProxy("127.0.0.1", 5672) as proxy:   # proxy.port forwards to 127.0.0.1:5672
        proxy.cut()       # every open connection reset, new ones refused
        proxy.restore()   # listening again, on the same port
        proxy.stall()     # a black hole: connections stay open, nothing goes through
        proxy.unstall()   # stalled connections closed, forwarding again
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stalled = False
        self._held: list[socket.socket] = []

    # ------------------------------------------------------------------ control

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def cut(self) -> None:
        """Stop listening and reset every connection, as a broker that went away."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            _close(listener)
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for client, upstream in pairs:
            for sock in (client, upstream):
                _close(sock)

    def stall(self) -> None:
        """A broker that is there but does not answer (stopped, swapping, partitioned): open
        connections and new ones stay up, and everything sent into them is swallowed."""
        self._stalled = True

    def unstall(self) -> None:
        """Close what the black hole held (its peers see their connections die) and forward
        again."""
        self._stalled = False
        with self._lock:
            held, self._held = self._held, []
            pairs, self._pairs = self._pairs, set()
        for sock in held:
            _close(sock)
        for client, upstream in pairs:
            _close(client)
            _close(upstream)

    def restore(self) -> None:
        """Listen again on the same port."""
        if self._listener is None:
            self.start()

    def close(self) -> None:
        self.unstall()
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ forwarding

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            if self._stalled:
                with self._lock:
                    self._held.append(client)  # accepted, never answered
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            pair = (client, upstream)
            with self._lock:
                if listener is not self._listener:  # cut meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._pairs.add(pair)
            thread = threading.Thread(target=self._pump, args=(pair,), daemon=True)
            thread.start()

    def _pump(self, pair: tuple[socket.socket, socket.socket]) -> None:
        client, upstream = pair
        peer = {client: upstream, upstream: client}
        sel = selectors.DefaultSelector()
        try:
            for sock in pair:
                sel.register(sock, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select(timeout=1.0):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    data = sock.recv(65536)
                    if not data:
                        return
                    if not self._stalled:
                        peer[sock].sendall(data)
                with self._lock:
                    if pair not in self._pairs:
                        return
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            with self._lock:
                self._pairs.discard(pair)
            for sock in pair:
                _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # SO_LINGER 0: a reset, not a polite FIN, like a broker that died.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
