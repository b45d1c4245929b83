"""A backend answering every request with a SIZE-byte body (blocking sockets, a thread per connection)."""
import socket, sys, threading
port, size = int(sys.argv[1]), int(sys.argv[2])
CHUNK = b"x" * (1 << 20)
def serve(c):
    try:
        _serve(c)
    except OSError:
        pass
def _serve(c):
    with c:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            _, buf = buf.split(b"\r\n\r\n", 1)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            left = size
            while left:
                n = min(left, len(CHUNK))
                c.sendall(CHUNK[:n]); left -= n
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(128)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
