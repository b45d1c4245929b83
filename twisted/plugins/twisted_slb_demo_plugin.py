# twistd plugin: `twistd slb-demo-backend`. The real work is in twisted_slb.demo.
from twisted.application.service import ServiceMaker

slb_demo_backend = ServiceMaker(
    "twisted_slb demo backend",
    "twisted_slb.demo",
    "A demo backend for twisted_slb: the check page showing its name and address",
    "slb-demo-backend",
)
