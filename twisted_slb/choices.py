"""
The names a configuration chooses between, each list defined once: the
configuration (L{twisted_slb.config}) checks a value against it, and the
code that acts on the value uses the same tuple.  No imports, so that every
module can import it without a cycle.
"""

#: The protocols of a listener.
PROTOCOLS = ("tcp", "http", "https", "udp")

#: The persistence types (C{persistence = { type = ... }}).
PERSISTENCE_TYPES = ("source_ip", "insert_cookie", "rewrite_cookie", "header", "learn_cookie")

#: The persistence types that keep their pins in a stick table.
TABLE_PERSISTENCE_TYPES = ("source_ip", "header", "learn_cookie")

#: What a persistence policy does when a client's pinned backend is down
#: (C{on_failure}): move the client to another one, or refuse it.
ON_FAILURE = ("repin", "strict")

#: What a listener does with connections over its C{max_connections}
#: (C{over_limit}): stop accepting until one closes, or close them.
OVER_LIMIT = ("wait", "close")

#: The PROXY protocol versions a TCP listener can send to its backends.
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")

#: The schedulers of a backend group (L{twisted_slb.scheduling.SCHEDULERS}).
SCHEDULER_NAMES = ("rr", "wrr", "wlc", "hash")

#: The health check types of a backend group.
HEALTH_CHECK_TYPES = ("tcp", "http", "udp", "none")

#: The stores of stick tables (C{[store] type}).
STORE_TYPES = ("memory", "redis")
