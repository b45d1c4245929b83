"""
The HTTP (layer 7) side of twisted_slb: the streaming reverse proxy, its
upstream connection pool, host/path routing, and the twisted.web site of an
embedded proxy (L{BalancerSite}).
"""

from twisted_slb.web.proxy import BalancedProxyResource
from twisted_slb.web.routing import HTTPSRedirectResource, Route, RuleRouter
from twisted_slb.web.site import BalancerSite
from twisted_slb.web.upstream import UpstreamPool
