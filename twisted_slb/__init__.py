"""
twisted_slb: a Twisted load balancer whose heart is session persistence.

The public API, re-exported:

 - backends and scheduling: L{Backend}, L{BackendGroup}, L{scheduler_for}
 - persistence: L{IPersistencePolicy}, L{Session}, L{SourceIPPersistence},
   L{StickTable}, L{InsertCookie}, L{RewriteCookie}, L{PersistenceResource}
 - listeners: L{TCPBalancerFactory}, L{BalancedProxyResource},
   L{BalancerSite}, L{RuleRouter}, L{Route}, L{HTTPSRedirectResource}
 - configuration and services: L{load_config}, L{parse_config},
   L{ConfigError}, L{BalancerService}
"""

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import ConfigError, load_config, parse_config
from twisted_slb.persistence.cookies import InsertCookie, RewriteCookie
from twisted_slb.persistence.interfaces import IPersistencePolicy, Session
from twisted_slb.persistence.resource import PersistenceResource
from twisted_slb.persistence.sourceip import SourceIPPersistence, StickTable
from twisted_slb.scheduling import scheduler_for
from twisted_slb.service import BalancerService
from twisted_slb.tcp import TCPBalancerFactory
from twisted_slb.web.proxy import BalancedProxyResource, BalancerSite
from twisted_slb.web.routing import HTTPSRedirectResource, Route, RuleRouter

__all__ = [
    "Backend",
    "BackendGroup",
    "BalancedProxyResource",
    "BalancerService",
    "BalancerSite",
    "ConfigError",
    "HTTPSRedirectResource",
    "IPersistencePolicy",
    "InsertCookie",
    "PersistenceResource",
    "RewriteCookie",
    "Route",
    "RuleRouter",
    "Session",
    "SourceIPPersistence",
    "StickTable",
    "TCPBalancerFactory",
    "load_config",
    "parse_config",
    "scheduler_for",
]
