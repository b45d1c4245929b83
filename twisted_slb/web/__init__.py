"""
The HTTP side of twisted_slb: the balancing proxy, forwarding rules, redirects.
"""
