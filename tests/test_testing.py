"""
Tests for L{twisted_slb.testing}: the in-memory rig answers as the real
balancer would, sends what the test asks (headers, cookies, client address,
body), and tells which backend answered.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_slb import HeaderPersistence, InsertCookie, PersistenceResource, SourceIPPersistence, StickTable
from twisted_slb.scheduling import scheduler_for
from twisted_slb.testing import BackendPage, BalancerRig


class RigTests(SynchronousTestCase):
    def test_backendThatAnsweredIsNamed(self) -> None:
        """Without a policy, round robin alternates: each answer names its backend, and its body is that backend's."""
        rig = BalancerRig(["a", "b"])
        answers = [rig.get("/") for _ in range(4)]
        self.assertEqual([a.backend for a in answers], ["a", "b", "a", "b"])
        self.assertEqual([a.code for a in answers], [200] * 4)
        self.assertEqual(answers[1].body, b"backend=b\n")

    def test_siteServerAnswersAlike(self) -> None:
        """C{server="site"} puts twisted.web's Site in front: the same policy gives the same answers."""
        rig = BalancerRig(["a", "b"], server="site")
        rig.serve(InsertCookie(rig.proxy, reactor=rig.reactor))
        first = rig.get("/")
        self.assertEqual(rig.get("/", cookies=first.cookies).backend, first.backend)

    def test_unknownServerIsRefused(self) -> None:
        """A server that is neither "front" nor "site" is a ValueError naming the field and the value."""
        error = self.assertRaises(ValueError, BalancerRig, ["a"], server="h2")
        self.assertIn("server: 'h2'", str(error))

    def test_clientAddressReachesPolicy(self) -> None:
        """The client address given is the one a source-IP policy sticks on and the backend sees forwarded."""
        rig = BalancerRig(["a", "b"])
        rig.serve(PersistenceResource(rig.proxy, SourceIPPersistence(StickTable(60, clock=rig.reactor))))
        one = {rig.get("/", client="192.0.2.10").backend for _ in range(3)}
        other = rig.get("/", client="2001:db8::7")
        self.assertEqual(len(one), 1)
        self.assertNotEqual(other.backend, one.pop())
        self.assertEqual(other.seen.headers.getRawHeaders(b"x-forwarded-for"), [b"2001:db8::7"])

    def test_badClientAddressIsRefused(self) -> None:
        """A client that is not an IP address is refused before anything is sent."""
        self.assertRaises(ValueError, BalancerRig(["a"]).get, "/", client="nobody")

    def test_headersAndBodyReachBackend(self) -> None:
        """Request headers, method, path and body arrive at the backend as sent."""
        rig = BalancerRig(["a"])
        answer = rig.request("PUT", "/cart?id=7", headers={"X-Tenant": "blue"}, body=b"two apples")
        self.assertEqual((answer.seen.method, answer.seen.uri, answer.seen.body), (b"PUT", b"/cart?id=7", b"two apples"))
        self.assertEqual(answer.seen.headers.getRawHeaders(b"x-tenant"), [b"blue"])

    def test_cookiesAreSentAndParsed(self) -> None:
        """C{Answer.cookies} reads back the cookie a policy set; sent again, it pins the client."""
        rig = BalancerRig(["a", "b", "c"])
        rig.serve(InsertCookie(rig.proxy, name=b"SERVERID", reactor=rig.reactor))
        first = rig.get("/")
        self.assertEqual(list(first.cookies), ["SERVERID"])
        self.assertTrue(first.set_cookies[0].startswith(b"SERVERID=" + first.cookies["SERVERID"].encode()))
        self.assertEqual({rig.get("/", cookies=first.cookies).backend for _ in range(4)}, {first.backend})

    def test_backendSetsCookies(self) -> None:
        """A backend's C{response_headers} are added to its answers: the test sees a backend's own cookie."""
        rig = BalancerRig(["a"])
        rig.pages["a"].response_headers.append((b"set-cookie", b"JSESSIONID=s1; Path=/"))
        self.assertEqual(rig.get("/").cookies, {"JSESSIONID": "s1"})

    def test_refusedBackendIsRetried(self) -> None:
        """A backend in C{refused} refuses connections: the proxy retries on another; with none left, a 502 that no backend answered."""
        rig = BalancerRig(["a", "b"])
        rig.refused.add("a")
        self.assertEqual({rig.get("/").backend for _ in range(3)}, {"b"})
        rig.refused.add("b")
        answer = rig.get("/")
        self.assertEqual((answer.code, answer.backend, answer.seen), (502, None, None))

    def test_downBackendIsNotChosen(self) -> None:
        """A backend marked down through C{rig.backend(name).up} gets no requests."""
        rig = BalancerRig(["a", "b"])
        rig.backend("a").up = False
        self.assertEqual({rig.get("/").backend for _ in range(3)}, {"b"})
        self.assertRaises(KeyError, rig.backend, "z")

    def test_schedulerIsTheGroups(self) -> None:
        """The scheduler given is the group's: a hash on a header sends equal values to one backend."""
        rig = BalancerRig(["a", "b", "c"], scheduler=scheduler_for("hash"))
        rig.group.hash_key = "header:X-Tenant"
        self.assertEqual(len({rig.get("/", headers={"X-Tenant": "blue"}).backend for _ in range(5)}), 1)

    def test_pagesReplaceBackends(self) -> None:
        """A resource given in C{pages} answers for its backend; its answers name no backend the rig knows of."""

        class Teapot(Resource):
            isLeaf = True

            def render(self, request):
                request.setResponseCode(418)
                return b"short and stout"

        rig = BalancerRig(["a"], pages={"a": Teapot()})
        answer = rig.get("/")
        self.assertEqual((answer.code, answer.body, answer.backend), (418, b"short and stout", None))

    def test_timeMovesOnlyWhenAdvanced(self) -> None:
        """The rig's reactor is the policy's clock: a table entry outlives 59 seconds and is gone after 61."""
        rig = BalancerRig(["a", "b"])
        rig.serve(PersistenceResource(rig.proxy, HeaderPersistence(StickTable(60, clock=rig.reactor), b"X-Session")))
        first = rig.get("/", headers={"X-Session": "s"}).backend
        rig.reactor.advance(59)
        self.assertEqual(rig.get("/", headers={"X-Session": "s"}).backend, first)
        rig.reactor.advance(61)
        self.assertNotEqual(rig.get("/", headers={"X-Session": "s"}).backend, first)

    def test_unansweredRequestFails(self) -> None:
        """A request still waiting once everything in memory ran is an AssertionError, not a hang."""

        class Never(Resource):
            isLeaf = True

            def render(self, request):
                return NOT_DONE_YET

        rig = BalancerRig(["a"], pages={"a": Never()})
        error = self.assertRaises(AssertionError, rig.get, "/slow")
        self.assertIn("GET /slow: no answer", str(error))

    def test_backendPageRecordsEachRequest(self) -> None:
        """A L{BackendPage} keeps every request it answered, oldest first."""
        rig = BalancerRig(["a"])
        rig.get("/1")
        rig.get("/2")
        page = rig.pages["a"]
        self.assertIsInstance(page, BackendPage)
        self.assertEqual([seen.uri for seen in page.seen], [b"/1", b"/2"])
