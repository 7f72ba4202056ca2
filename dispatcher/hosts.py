"""Which hosts only this machine can reach: the one test behind every "loopback only" rule."""

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP literal, IPv6 with or without brackets) is loopback.

    Only `localhost` counts among names: any other name may resolve to an outside address.
    """
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name or a host name: it may well face a network
        return False
