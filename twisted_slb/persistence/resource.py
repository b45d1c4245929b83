"""
Putting a persistence policy in front of an HTTP resource.

A persistence policy is not part of the proxy: it wraps it.  For each request
the wrapper asks its policy which backend the client is pinned to and leaves
the answer in the request's L{Session} (see
L{twisted_slb.persistence.interfaces.session_for}); the proxy behind it routes
with that answer and calls the policy back (C{remember}) when the backend's
response headers are in, before anything reaches the client::

    proxy = BalancedProxyResource(group)
    site = Site(PersistenceResource(proxy, SourceIPPersistence(table)))

The cookie policies (L{twisted_slb.persistence.cookies}) are subclasses that
are both the wrapper and the policy.
L{twisted_slb.persistence.build.wrap_with_persistence} builds the right
wrapper for a L{twisted_slb.config.PersistenceConfig}.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource, getChildForRequest

from twisted_slb.persistence.interfaces import IPersistencePolicy, session_for

log = Logger(namespace="twisted_slb.persistence.resource")


class PersistenceResource(Resource):
    """
    A resource that puts a persistence policy in front of another resource
    (normally a L{twisted_slb.web.proxy.BalancedProxyResource}).

    For each request it sets C{session.policy} and C{session.pinned_key}
    (the policy's C{find}) on the request's L{Session}, then renders the
    wrapped resource, which routes with them and calls
    C{session.policy.remember} once a backend answers.

    Subclasses that implement L{IPersistencePolicy} themselves (the cookie
    policies, or a user's own, see C{examples/sticky_header_policy.py}) pass
    no C{policy}: the resource is its own policy.

    @ivar wrapped: the resource that does the work.
    @ivar policy: the L{IPersistencePolicy} consulted for each request.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, policy: Optional[IPersistencePolicy] = None) -> None:
        """
        @param wrapped: the resource rendered for each request, after the
            policy's C{find}.
        @param policy: the policy; L{None} means C{self}, for subclasses that
            implement L{IPersistencePolicy}.
        @raise TypeError: no policy was given and this object is not one.
        """
        Resource.__init__(self)
        if policy is None:
            if not IPersistencePolicy.providedBy(self):
                raise TypeError(
                    f"{type(self).__name__} needs a policy: pass one, or declare "
                    "@implementer(IPersistencePolicy) on the subclass"
                )
            policy = self
        self.wrapped = wrapped
        self.policy = policy

    def render(self, request: IRequest) -> object:
        """
        Ask the policy where this client is pinned, then render the wrapped
        resource.

        A policy whose C{find} raises is a bug, not bad traffic: it is logged
        and the request is balanced as if the client were not pinned, rather
        than answered with a 500.
        """
        session = session_for(request)
        session.policy = self.policy
        try:
            found = self.policy.find(session)
            if isinstance(found, Deferred):
                # A shared table's lookup: the proxy waits for it (bounded
                # by the store's timeout) before it chooses a backend.
                session.lookup = found
                found = None
            session.pinned_key = found
        except Exception:
            log.failure(
                "persistence policy {policy!r} failed to read the request; balancing it unpinned",
                policy=self.policy,
            )
            session.pinned_key = None
        return getChildForRequest(self.wrapped, request).render(request)

    def __repr__(self) -> str:
        if self.policy is self:
            return f"<{type(self).__name__} wrapping {self.wrapped!r}>"
        return f"<{type(self).__name__} {self.policy!r} wrapping {self.wrapped!r}>"
