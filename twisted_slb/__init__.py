"""
twisted_slb: a Twisted load balancer whose heart is session persistence.

The public API is re-exported here.
"""

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import ConfigError, load_config
from twisted_slb.persistence.interfaces import IPersistencePolicy, Session

__all__ = [
    "Backend",
    "BackendGroup",
    "ConfigError",
    "IPersistencePolicy",
    "Session",
    "load_config",
]
