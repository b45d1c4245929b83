"""
The measured performance layer, private: lean TCP transports
(L{twisted_slb._io.lean}), the socket helpers they and the listeners share
(L{twisted_slb._io.sockets}), the reactor C{twistd slb} runs
(L{twisted_slb._io.reactor}), the header store of the HTTP hot path
(L{twisted_slb._io.headers}), one timer for many deadlines
(L{twisted_slb._io.timers}), the start-up heap and freed-memory trimming
(L{twisted_slb._io.heap}) and the accept guard of listening ports
(L{twisted_slb._io.accept}).

Nothing here is API: the public modules are the ones L{twisted_slb}
exports and the documentation names.  The few entry points an embedder
uses have public faces: L{twisted_slb.reactor.install} and
L{twisted_slb.tcp.serve_lean}.  docs/performance.md says why each piece
exists and what it measured.
"""
