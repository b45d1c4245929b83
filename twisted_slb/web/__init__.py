"""
The HTTP (layer 7) side of twisted_slb: the streaming reverse proxy, its
upstream connection pool, and host/path routing.
"""

from twisted_slb.web.proxy import BalancedProxyResource, BalancerSite
from twisted_slb.web.routing import HTTPSRedirectResource, Route, RuleRouter
from twisted_slb.web.upstream import UpstreamPool
