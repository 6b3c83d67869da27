"""Links: a byte stream to the peer, opened from a pyserial URL (docs/sync-protocol.md §1).

`socket://host:port` (TCP), a serial device (`/dev/ttyUSB0`, `/dev/ttyACM0`, a pseudo-terminal,
`COM3`), and anything else `serial.serial_for_url` opens (`rfc2217://`, `loop://`).  Every link
has the same three operations: `read(timeout)` returns what has arrived (b"" when nothing came
in time) and raises :class:`LinkClosed` when the peer hung up; `write(data)` sends all of it;
`close()`.

pyserial's `socket://` is a client, so `serve` on TCP binds a plain listening socket and wraps
each accepted connection in the same interface (:class:`Listener`); `serve` on a serial line
opens the device once, and sessions follow one another on it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from urllib.parse import urlparse

from qes_edge.sync.defaults import DEFAULT_BAUD


class LinkError(Exception):
    """A link that cannot be opened (a bad URL, a refused connection, a missing device)."""


class LinkClosed(Exception):
    """The peer hung up, or the device went away."""


class Link:
    name = "?"

    def read(self, timeout: float) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def write(self, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        pass


class SocketLink(Link):
    """A connected TCP (or Unix) socket."""

    def __init__(self, sock: socket.socket, name: str, owner=None):
        self.sock, self.name, self._owner = sock, name, owner
        sock.setblocking(True)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a socketpair in tests)

    def read(self, timeout: float) -> bytes:
        try:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not ready:
                return b""
            data = self.sock.recv(65536)
        except (OSError, ValueError) as e:
            raise LinkClosed(f"{self.name}: {getattr(e, 'strerror', None) or e}") from None
        if not data:
            raise LinkClosed(f"{self.name}: the peer closed the connection")
        return data

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ValueError) as e:
            raise LinkClosed(f"{self.name}: {getattr(e, 'strerror', None) or e}") from None

    def close(self) -> None:
        try:
            if self._owner is not None:
                self._owner.close()
            self.sock.close()
        except OSError:
            pass


class FdLink(Link):
    """A file descriptor: a pseudo-terminal's master side, a pipe (tests, and bridges)."""

    def __init__(self, fd: int, name: str, close_fd: bool = True):
        self.fd, self.name, self._close = fd, name, close_fd

    def read(self, timeout: float) -> bytes:
        try:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
            if not ready:
                return b""
            data = os.read(self.fd, 65536)
        except (OSError, ValueError) as e:
            if isinstance(e, OSError) and e.errno in (errno.EAGAIN, errno.EINTR):
                return b""
            raise LinkClosed(f"{self.name}: {getattr(e, 'strerror', None) or e}") from None
        if not data:
            raise LinkClosed(f"{self.name}: the other end was closed")
        return data

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except BlockingIOError:  # a full tty buffer: wait for room
            select.select([], [self.fd], [], 1.0)
            self.write(bytes(view))
        except (OSError, ValueError) as e:
            raise LinkClosed(f"{self.name}: {getattr(e, 'strerror', None) or e}") from None

    def close(self) -> None:
        if self._close:
            try:
                os.close(self.fd)
            except OSError:
                pass


class SerialLink(Link):
    """A pyserial port.  On POSIX the device's descriptor is read directly (select + read, so
    that bytes that came before a hang-up are not thrown away with it); elsewhere pyserial's
    own read and in_waiting."""

    def __init__(self, ser, name: str):
        import serial
        self.ser, self.name, self._exc = ser, name, serial.SerialException
        fd = getattr(ser, "fd", None)
        self._fd = fd if isinstance(fd, int) and fd >= 0 else None

    def read(self, timeout: float) -> bytes:
        if self._fd is not None:
            try:
                ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
                if not ready:
                    return b""
                data = os.read(self._fd, 65536)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    return b""
                raise LinkClosed(f"{self.name}: {e.strerror or e}") from None
            if not data:
                raise LinkClosed(f"{self.name}: the device went away")
            return data
        try:
            self.ser.timeout = max(0.0, timeout)
            first = self.ser.read(1)
            if not first:
                return b""
            self.ser.timeout = 0
            waiting = self.ser.in_waiting
            return first + (self.ser.read(waiting) if waiting else b"")
        except (self._exc, OSError) as e:
            raise LinkClosed(f"{self.name}: {e}") from None

    def write(self, data: bytes) -> None:
        try:
            self.ser.write(data)
        except (self._exc, OSError) as e:
            raise LinkClosed(f"{self.name}: {e}") from None

    def close(self) -> None:
        try:
            self.ser.close()
        except (self._exc, OSError):
            pass


def _serial_for_url(url: str, baudrate: int):
    import serial
    try:
        return serial.serial_for_url(url, baudrate=baudrate, timeout=0, write_timeout=None)
    except ValueError as e:
        raise LinkError(f"{url}: {e}") from None
    except (serial.SerialException, OSError) as e:
        msg = str(e)
        raise LinkError(msg if url in msg else f"cannot open {url}: {msg}") from None


def open_link(url: str, baudrate: int = DEFAULT_BAUD) -> Link:
    """Connect to a peer: `socket://host:port`, a serial device, or any pyserial URL."""
    if not url or not url.strip():
        raise LinkError("no peer given (a URL such as socket://host:8765 or /dev/ttyUSB0)")
    ser = _serial_for_url(url, baudrate)
    sock = getattr(ser, "_socket", None)  # pyserial's socket:// handler: read the socket itself
    if url.startswith("socket://") and isinstance(sock, socket.socket):
        return SocketLink(sock, url, owner=ser)
    return SerialLink(ser, url)


def _tcp_address(url: str) -> tuple[str, int]:
    try:
        parts = urlparse(url)
        port = parts.port
    except ValueError as e:
        raise LinkError(f"{url}: {e}") from None
    if port is None:
        raise LinkError(f"{url}: no port (socket://HOST:PORT, HOST may be empty for every interface)")
    return parts.hostname or "", port


class Listener:
    """Where `serve` waits: a TCP port for `socket://HOST:PORT` (port 0: any free port, see
    `url`), or a serial device opened once."""

    def __init__(self, url: str, baudrate: int = DEFAULT_BAUD):
        self.url = url
        self._sock = None
        self._line = None
        if url.startswith("socket://"):
            host, port = _tcp_address(url)
            try:
                self._sock = socket.create_server((host, port), reuse_port=False)
            except OSError as e:
                raise LinkError(f"cannot listen on {url}: {e.strerror or e}") from None
            bound_host, bound_port = self._sock.getsockname()[:2]
            self.url = f"socket://{host or bound_host}:{bound_port}"
        else:
            self._line = SerialLink(_serial_for_url(url, baudrate), url)

    @property
    def is_serial(self) -> bool:
        return self._line is not None

    def accept(self, timeout: float | None = None) -> Link | None:
        """The next connection (None when none came within timeout); a serial line is the same
        link every time."""
        if self._line is not None:
            return self._line
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return None
        conn, addr = self._sock.accept()
        return SocketLink(conn, f"{addr[0]}:{addr[1]}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._line is not None:
            self._line.close()
