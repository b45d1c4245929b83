"""A backend answering every request head with a 1 MB body (keep-alive)."""
import sys
from twisted.internet import protocol, reactor
BODY = b"x" * (1 << 20)
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n" % len(BODY)
class B(protocol.Protocol):
    buf = b""
    def dataReceived(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.transport.write(HEAD); self.transport.write(BODY)
f = protocol.Factory.forProtocol(B)
for port in sys.argv[1:]:
    reactor.listenTCP(int(port), f, interface="127.0.0.1", backlog=4096)
reactor.run()
