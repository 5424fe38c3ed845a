"""Where a webhook may be sent. The threat: a caller names an address only the server can reach
(the cloud metadata service at 169.254.169.254, a database on localhost, the private network) and
uses our deliveries to reach it. So a destination must be http(s), and every address its host
resolves to must be public, unless the operator allow-listed that host, address or network
(`SLIMFORMER_WEBHOOK_ALLOWED_HOSTS`). Checked when an endpoint is created and again before each
attempt, since DNS can change in between."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from app.settings import get_settings


class UnsafeDestination(ValueError):
    pass


def check_url(url: str) -> None:
    """Raises UnsafeDestination saying why `url` may not receive webhooks."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeDestination("webhook URLs must be http or https")
    host = parts.hostname
    if not host:
        raise UnsafeDestination("webhook URL has no host")
    if parts.username or parts.password:
        raise UnsafeDestination("webhook URLs may not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeDestination(f"bad port in webhook URL: {exc}") from exc
    allowed = get_settings().webhook_allowed_hosts
    if host.lower() in {entry.lower() for entry in allowed}:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeDestination(f"webhook host {host!r} does not resolve") from exc
    networks = [_network(entry) for entry in allowed]
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(network is not None and address in network for network in networks):
            continue
        if not address.is_global or address.is_multicast:
            raise UnsafeDestination(
                f"webhook host {host!r} resolves to {address}, a loopback, private, link-local "
                "or reserved address; an operator may allow it with "
                "SLIMFORMER_WEBHOOK_ALLOWED_HOSTS"
            )


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None  # a host name, matched above
