"""
twisted_slb: a Twisted load balancer whose heart is session persistence.

The public API, re-exported:

 - backends and scheduling: L{Backend}, L{BackendGroup}, L{scheduler_for}
 - persistence: L{IPersistencePolicy}, L{Session}, L{SourceIPPersistence},
   L{HeaderPersistence}, L{LearnCookiePersistence}, L{TablePersistence},
   L{StickTable}, L{IStickTable}, L{InsertCookie}, L{RewriteCookie},
   L{PersistenceResource}
 - listeners: L{TCPBalancerFactory}, L{serve_lean}, L{BalancedProxyResource},
   L{BalancerSite}, L{RuleRouter}, L{Route}, L{GroupSplit}, L{SplitChoice},
   L{HTTPSRedirectResource}
 - configuration and services: L{load_config}, L{parse_config},
   L{ConfigError}, L{BalancerService}
"""

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import ConfigError, load_config, parse_config
from twisted_slb.persistence.cookies import InsertCookie, RewriteCookie
from twisted_slb.persistence.interfaces import IPersistencePolicy, Session
from twisted_slb.persistence.resource import PersistenceResource
from twisted_slb.persistence.sourceip import SourceIPPersistence
from twisted_slb.persistence.tables import (
    HeaderPersistence,
    IStickTable,
    LearnCookiePersistence,
    StickTable,
    TablePersistence,
)
from twisted_slb.scheduling import scheduler_for
from twisted_slb.service import BalancerService
from twisted_slb.tcp import TCPBalancerFactory, serve_lean
from twisted_slb.web.proxy import BalancedProxyResource
from twisted_slb.web.routing import GroupSplit, HTTPSRedirectResource, Route, RuleRouter, SplitChoice
from twisted_slb.web.site import BalancerSite

__all__ = [
    "Backend",
    "BackendGroup",
    "BalancedProxyResource",
    "BalancerService",
    "BalancerSite",
    "ConfigError",
    "GroupSplit",
    "HeaderPersistence",
    "HTTPSRedirectResource",
    "IPersistencePolicy",
    "IStickTable",
    "InsertCookie",
    "LearnCookiePersistence",
    "PersistenceResource",
    "RewriteCookie",
    "Route",
    "RuleRouter",
    "Session",
    "SourceIPPersistence",
    "SplitChoice",
    "StickTable",
    "TCPBalancerFactory",
    "TablePersistence",
    "load_config",
    "parse_config",
    "scheduler_for",
    "serve_lean",
]
