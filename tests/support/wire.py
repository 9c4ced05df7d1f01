"""A TCP proxy in front of PostgreSQL that counts the round trips its clients make: the messages of
the wire protocol that ask the server to answer (Sync ends an extended-protocol batch; Query is a
simple-protocol statement such as psycopg's BEGIN and COMMIT). Statement counters cannot see
BEGIN and COMMIT, which the driver sends on its own."""
import socket
import struct
import threading
from urllib.parse import urlsplit, urlunsplit

ANSWERED_MESSAGES = {b"S", b"Q"}  # Sync, Query
STARTUP_CODES_WITHOUT_SESSION = {80877103, 80877104}  # SSLRequest, GSSENCRequest: a startup message follows


class RoundTripCounter:
    """Listens on 127.0.0.1 and forwards to the server of `url`; `url_through` is the URL to give
    clients (no TLS, so that the messages can be read); `round_trips` counts, `kinds` lists them."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
        query = "&".join(filter(None, [parts.query, "sslmode=disable", "gssencmode=disable"]))
        self.url_through = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
        self._lock = threading.Lock()
        self.kinds: list[str] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def round_trips(self) -> int:
        return len(self.kinds)

    def reset(self) -> None:
        with self._lock:
            self.kinds.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            threading.Thread(target=self._client_to_server, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        buffer, started = b"", False
        try:
            while data := client.recv(65536):
                server.sendall(data)
                buffer += data
                while True:
                    if not started:  # length, then a code: no type byte before the session starts
                        if len(buffer) < 8:
                            break
                        length, code = struct.unpack("!ii", buffer[:8])
                        if len(buffer) < length:
                            break
                        buffer, started = buffer[length:], code not in STARTUP_CODES_WITHOUT_SESSION
                        continue
                    if len(buffer) < 5:
                        break
                    kind, length = buffer[:1], struct.unpack("!i", buffer[1:5])[0]
                    if len(buffer) < 1 + length:
                        break
                    if kind in ANSWERED_MESSAGES:
                        with self._lock:
                            self.kinds.append("sync" if kind == b"S" else buffer[5:1 + length].rstrip(b"\0").decode())
                    buffer = buffer[1 + length:]
        except OSError:
            pass
        finally:
            for end in (client, server):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
