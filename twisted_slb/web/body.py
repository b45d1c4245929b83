# -*- test-case-name: tests.test_body -*-
"""
Request bodies as streams: how a listener hands a request body to whoever
forwards it, as it arrives, with back-pressure both ways.

A request whose body is streamed has C{request.body}, an L{IRequestBody},
and C{request.content} L{None}; a request whose body was read whole first
(C{request_buffering = true}, or twisted.web's own L{twisted.web.server.Request})
has C{request.content}, a file, and no C{body}.  The protocol that reads the
client's bytes (the HTTP/1.1 listener, L{twisted_slb.web.front}; an HTTP/2
stream) feeds an L{StreamedBody}; the proxy consumes it:

    1. the protocol creates C{StreamedBody(reader, length)} when the request
       head is read (C{length} the announced size, or L{None} when only the
       end says it: a chunked body, an HTTP/2 stream without
       C{content-length}), puts it on the request, and hands the request
       to the resource tree at once;
    2. it calls L{StreamedBody.feed} with each piece of body (framing
       removed), then L{StreamedBody.finish} at the end, or
       L{StreamedBody.fail} with a L{BodyError} when the body will never be
       whole (a bad chunk, over C{max_body_bytes}, the client idle, gone);
    3. the consumer calls L{StreamedBody.deliver_to} with an L{IBodyConsumer}
       and, as an L{IPushProducer}, is paused and resumed by whatever it
       writes to (the backend connection's transport: the proxy registers
       the body as that transport's producer);
    4. the body calls its reader's L{IBodyReader.pause_body} when more than
       L{HIGH_WATER} bytes wait (the consumer paused, or not there yet), and
       L{IBodyReader.resume_body} when they are gone: the HTTP/1.1 listener
       stops reading the client's socket, an HTTP/2 stream stops opening its
       flow-control window.  Nothing grows without bound: what a body holds
       is at most one read over L{HIGH_WATER};
    5. a consumer that wants no more (the response ended before the upload,
       the backend connection failed) calls L{StreamedBody.stopProducing}:
       the rest of the body is read and dropped (L{IBodyReader.discard_body}),
       so that a keep-alive connection stays in step.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.internet.interfaces import IPushProducer
from zope.interface import Attribute, Interface, implementer

#: Bytes a body holds for a consumer that is paused (or not there yet)
#: before its reader stops reading from the client.
HIGH_WATER = 64 * 1024


class BodyError(Exception):
    """
    Why a request body will never be whole: C{code} is the status the
    listener answers with when no response has started (400, 408, 413).
    """

    def __init__(self, why: str, code: int = 400) -> None:
        Exception.__init__(self, why)
        self.code = code


class IBodyConsumer(Interface):
    """What a request body is delivered to (the proxy's exchange)."""

    def body_data(data: bytes) -> None:
        """The next bytes of the body, framing removed."""

    def body_end() -> None:
        """The whole body has been delivered."""

    def body_failed(reason: BodyError) -> None:
        """The body will never be whole; nothing more is delivered."""


class IBodyReader(Interface):
    """The protocol that reads a body from the client, as its body sees it."""

    def pause_body() -> None:
        """Stop reading body bytes from the client for now."""

    def resume_body() -> None:
        """Read body bytes from the client again."""

    def discard_body() -> None:
        """Nobody wants the rest of the body: read it, and drop it."""


class IRequestBody(Interface):
    """
    A request body that arrives while the request is being forwarded; also
    an L{IPushProducer} (the methods below), to register with whatever the
    consumer writes to.
    """

    length = Attribute("The announced size in bytes, or None when only the end of the body says it.")
    received = Attribute("Body bytes read from the client so far.")
    complete = Attribute("Whether the whole body has been read from the client.")
    started = Attribute("Whether any byte was delivered to a consumer (then the request cannot be sent again).")

    def deliver_to(consumer: IBodyConsumer) -> None:
        """
        Deliver the body to C{consumer}: what arrived already at once (unless
        paused), the rest as it comes, then C{body_end} or C{body_failed}.
        """

    def pauseProducing() -> None:
        """Deliver nothing for now (past L{HIGH_WATER} waiting bytes, the client is paused too)."""

    def resumeProducing() -> None:
        """Deliver what waits, and read from the client again."""

    def stopProducing() -> None:
        """Deliver nothing more: the rest of the body is read and dropped."""


@implementer(IRequestBody, IPushProducer)
class StreamedBody:
    """
    The L{IRequestBody} every listener protocol can use: it holds what the
    consumer is not ready for (up to L{HIGH_WATER}, then it pauses the
    reader), and delivers in order.

    @ivar waiting: the bytes held for the consumer.
    @ivar failure: the L{BodyError} the body failed with, or L{None}.
    """

    consumer = None
    paused = False  # by the consumer
    reader_paused = False
    stopped = False
    complete = False
    started = False
    failure: Optional[BodyError] = None
    delivering = False

    def __init__(self, reader: IBodyReader, length: Optional[int]) -> None:
        self.reader = reader
        self.length = length
        self.received = 0
        self.waiting: List[bytes] = []
        self.waiting_bytes = 0

    def __repr__(self) -> str:
        return f"<StreamedBody {self.received} of {self.length} bytes, {len(self.waiting)} waiting>"

    # -- the reader's side ------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Body bytes from the client (framing removed)."""
        self.received += len(data)
        if self.stopped or not data:
            return
        if self.consumer is not None and not self.paused and not self.waiting:
            self.started = True
            self.consumer.body_data(data)
            return
        self.waiting.append(data)
        self.waiting_bytes += len(data)
        if self.waiting_bytes >= HIGH_WATER and not self.reader_paused:
            self.reader_paused = True
            self.reader.pause_body()

    def finish(self) -> None:
        """The whole body was read."""
        self.complete = True
        self.reader_paused = False  # the reader reads what follows the body on its own terms
        self._flush()

    def fail(self, reason: BodyError) -> None:
        """The body will never be whole."""
        if self.complete or self.failure is not None:
            return
        self.failure = reason
        self.waiting = []
        self.waiting_bytes = 0
        consumer, self.consumer = self.consumer, None
        if consumer is not None and not self.stopped:
            consumer.body_failed(reason)

    # -- the consumer's side ----------------------------------------------

    def deliver_to(self, consumer: IBodyConsumer) -> None:
        if self.consumer is not None:
            raise RuntimeError(f"{self!r} already delivers to {self.consumer!r}")
        if self.failure is not None:
            consumer.body_failed(self.failure)
            return
        self.consumer = consumer
        self._flush()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._flush()

    def stopProducing(self) -> None:
        """The consumer wants no more: the rest is read from the client and dropped."""
        if self.stopped:
            return
        self.stopped = True
        self.consumer = None
        self.waiting = []
        self.waiting_bytes = 0
        if not self.complete and self.failure is None:
            self.reader_paused = False
            self.reader.discard_body()

    def _flush(self) -> None:
        """Deliver what waits, while the consumer takes it."""
        if self.delivering:
            return  # a consumer that resumed us from within body_data: the loop below goes on
        self.delivering = True
        try:
            while self.waiting and self.consumer is not None and not self.paused:
                data = self.waiting.pop(0)
                self.waiting_bytes -= len(data)
                self.started = True
                self.consumer.body_data(data)
        finally:
            self.delivering = False
        if self.stopped or self.failure is not None:
            return
        if self.reader_paused and self.waiting_bytes < HIGH_WATER and not self.complete:
            self.reader_paused = False
            self.reader.resume_body()
        if self.complete and not self.waiting and self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            consumer.body_end()
