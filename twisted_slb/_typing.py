"""
Names for type checkers only (nothing here is used at run time).

Twisted types C{Protocol.transport} as C{Optional[ITransport]}: a protocol
may exist before it is connected. The protocols of this package use their
transport only once connected, and rely on more than L{ITransport}: the
stream transports of Twisted's reactors (TCP, TLS) and of
L{twisted_slb._io.lean} also abort, are consumers and push producers.
L{IStreamTransport} names that whole contract so that a protocol can declare
C{transport: IStreamTransport}.
"""

from zope.interface import Attribute

from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    The transport of a connected stream: a TCP or TLS connection of
    Twisted's reactors, or a transport of L{twisted_slb._io.lean}.
    """

    bufferSize = Attribute("The number of bytes read at a time.")
