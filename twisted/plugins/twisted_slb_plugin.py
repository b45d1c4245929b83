# twistd plugin: `twistd slb`. The real work is in twisted_slb.tap.
from twisted.application.service import ServiceMaker

slb = ServiceMaker(
    "twisted_slb",
    "twisted_slb.tap",
    "A load balancer with session persistence for TCP, HTTP and HTTPS",
    "slb",
)
