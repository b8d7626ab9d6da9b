"""The one gate for every URL the server itself fetches or posts to (webhooks now; image inputs and
LoRA URLs next): SSRF protection.

By default only public addresses are reachable. A URL is checked in two steps:

- `check_url(url, policy)` (cheap, at submit time: a 422 there): an absolute http(s) URL with a host,
  no credentials, no whitespace, at most 2048 characters; when the host is an IP address — written in
  ANY notation a resolver would accept: dotted, decimal `2130706433`, hex `0x7f000001`, octal
  `0177.0.0.1`, short `127.1`, IPv6 and IPv4-mapped IPv6 `[::ffff:127.0.0.1]` — or `localhost`, the
  address must be allowed.
- `resolve_url(url, policy)` (at fetch time): resolves the host name ONCE and refuses the URL when any
  of its addresses is not allowed; the result, a `CheckedURL`, carries the addresses that were
  checked.

`guarded_request(method, url, policy=...)` (and `guarded_get` / `guarded_post`) then connects to the
checked address itself — there is no second DNS lookup, so a name that re-resolves to a private
address (DNS rebinding) cannot slip through — while the request keeps the original `Host` header and,
for https, the original name for SNI and certificate verification. Redirects are not followed (a
redirect to a private address would bypass the check; callers see the 3xx). The response body is
read up to `max_bytes` and the whole exchange is bounded by `total_timeout`.

Not allowed unless the policy says so: loopback, private (RFC 1918, ULA), link-local (incl. the cloud
metadata address 169.254.169.254), CGNAT 100.64/10, multicast, reserved, unspecified, documentation
and benchmarking ranges, and IPv6 forms that embed an IPv4 address (IPv4-mapped are judged as the
IPv4 address they carry; 6to4, NAT64 and Teredo are refused). `NetPolicy(allow_private=True)`
(`--webhook-allow-private`) allows every address; `allow_cidrs` (`--webhook-allow-cidr`) allows the
listed networks only, for on-prem receivers.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional, Union
from urllib.parse import urlsplit

import httpx

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
# host, port -> the addresses it resolves to (as text). The default is the system resolver.
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 2048
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_TOTAL_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 1 << 20

# Ranges refused beyond what `ipaddress` calls non-global (CGNAT, multicast and the IPv6 forms that
# carry an IPv4 address are "global" to it).
_ALWAYS_DENIED: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))


class BlockedURL(ValueError):
    """A URL the server must not fetch: malformed, or pointing at an address the policy refuses.
    The message is fit for a 422 / a log line (it names the host, never credentials)."""


@dataclass(frozen=True)
class NetPolicy:
    """Which addresses server-side fetches may reach. `resolver` is for tests (a name -> loopback
    map); None uses the system resolver."""

    allow_private: bool = False
    allow_cidrs: tuple[IPNetwork, ...] = ()
    resolver: Optional[Resolver] = field(default=None, compare=False)

    @classmethod
    def from_options(cls, allow_private: bool = False, allow_cidrs: Iterable[str] = (),
                     resolver: Optional[Resolver] = None) -> NetPolicy:
        """From the option values (`--webhook-allow-private`, `--webhook-allow-cidr` texts); raises
        ValueError naming a bad CIDR."""
        return cls(bool(allow_private), tuple(parse_cidr(c) for c in allow_cidrs), resolver)

    def allows(self, ip: IPAddress) -> bool:
        ip = _unmap(ip)
        if self.allow_private:
            return True
        if any(ip.version == n.version and ip in n for n in self.allow_cidrs):
            return True
        return is_public_address(ip)


def parse_cidr(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP network: {text!r} (use e.g. 10.0.0.0/8 or fd00::/8)") from None


def _unmap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public_address(ip: IPAddress) -> bool:
    """Whether `ip` is a public unicast address (IPv4-mapped IPv6 judged as its IPv4 address)."""
    ip = _unmap(ip)
    if any(ip.version == n.version and ip in n for n in _ALWAYS_DENIED):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_unspecified or ip.is_private)


_V4_PART = re.compile(r"(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)")


def parse_ip_literal(host: str) -> Optional[IPAddress]:
    """The address `host` denotes when it is an IP literal in any notation a resolver accepts
    (inet_aton's: 1 to 4 parts, each decimal, 0x hex or 0 octal, the last filling the remaining
    bytes; or IPv6, with or without brackets and zone); None for a host name."""
    h = host.strip().rstrip(".") if host else ""
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if ":" in h:
        try:
            return ipaddress.IPv6Address(h.split("%", 1)[0])
        except ValueError:
            return None
    parts = h.split(".")
    if not 1 <= len(parts) <= 4 or not all(_V4_PART.fullmatch(p) for p in parts):
        return None
    values = []
    for p in parts:
        if p[:2] in ("0x", "0X"):
            values.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p.startswith("0"):
            values.append(int(p, 8))
        else:
            values.append(int(p))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for v in head:
        number = number * 256 + v
    number = number * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(number)


def _is_localhost_name(host: str) -> bool:
    h = host.lower().rstrip(".")
    return h == "localhost" or h.endswith(".localhost")


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed the policy, with the addresses its host resolved to (all allowed)."""

    url: str
    scheme: str
    host: str  # as written (lowercase), without brackets
    port: int
    addresses: tuple[IPAddress, ...]


def _split(url: str) -> tuple[str, str, int]:
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise BlockedURL(f"url must be a non-empty string of at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise BlockedURL("url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BlockedURL(f"url is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BlockedURL("url must use http or https")
    if not parts.hostname:
        raise BlockedURL("url has no host")
    if parts.username is not None or parts.password is not None:
        raise BlockedURL("url must not carry credentials")
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def _refuse(host: str, ip: IPAddress) -> BlockedURL:
    return BlockedURL(f"url host {host!r} is {ip}, not a public address; server-side requests only go "
                      "to public addresses (an operator can allow private ones: --webhook-allow-private "
                      "or --webhook-allow-cidr)")


def check_url(url: str, policy: NetPolicy) -> str:
    """The checks that need no DNS (for a 422 at submit): syntax, and the address when the host is an
    IP literal in any notation, or `localhost`. Returns the URL; raises BlockedURL."""
    _, host, _ = _split(url)
    ip = parse_ip_literal(host)
    if ip is None and _is_localhost_name(host):
        ip = ipaddress.IPv4Address("127.0.0.1")
    if ip is not None and not policy.allows(ip):
        raise _refuse(host, ip)
    return url


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def resolve_url(url: str, policy: NetPolicy) -> CheckedURL:
    """`check_url`, then the host name resolved once; refuses the URL when any address it resolves to
    is not allowed (or it does not resolve). Raises BlockedURL."""
    scheme, host, port = _split(url)
    ip = parse_ip_literal(host)
    if ip is not None:
        addresses: list[IPAddress] = [ip]
    else:
        resolver = policy.resolver or _system_resolver
        try:
            found = resolver(host, port)
        except OSError as exc:
            raise BlockedURL(f"url host {host!r} does not resolve: {exc}") from None
        addresses = []
        for text in found:
            try:
                addresses.append(ipaddress.ip_address(str(text).split("%", 1)[0]))
            except ValueError:
                raise BlockedURL(f"url host {host!r} resolved to {text!r}, not an address") from None
        if not addresses:
            raise BlockedURL(f"url host {host!r} does not resolve")
    for a in addresses:
        if not policy.allows(a):
            raise _refuse(host, a)
    return CheckedURL(url=url, scheme=scheme, host=host, port=port, addresses=tuple(dict.fromkeys(addresses)))


# -------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class GuardedResponse:
    status_code: int
    headers: Mapping[str, str]
    content: bytes
    address: str  # the address it was fetched from


class ResponseTooLarge(httpx.HTTPError):
    def __init__(self, limit: int):
        super().__init__(f"response body larger than {limit} bytes")


class TotalTimeout(httpx.TimeoutException):
    def __init__(self, seconds: float):
        super().__init__(f"no complete response within {seconds:g} s")


_SSL_CONTEXT: Optional[ssl.SSLContext] = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = httpx.create_ssl_context()
    return _SSL_CONTEXT


def guarded_request(method: str, url: str | CheckedURL, *, policy: NetPolicy,
                    content: Optional[bytes] = None, headers: Optional[Mapping[str, str]] = None,
                    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                    total_timeout: float = DEFAULT_TOTAL_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
                    verify: Union[bool, ssl.SSLContext, None] = None) -> GuardedResponse:
    """One request to a checked URL (`resolve_url` runs first when given text), connected to the first
    checked address: the connection never looks the name up again. Keeps `Host` and, for https, SNI
    and certificate verification against the URL's host name. No redirects followed, the body read up
    to `max_bytes` (ResponseTooLarge beyond), the whole exchange within `total_timeout` (TotalTimeout),
    connecting within `connect_timeout`. Raises BlockedURL or an httpx.HTTPError."""
    checked = url if isinstance(url, CheckedURL) else resolve_url(url, policy)
    address = checked.addresses[0]
    target = httpx.URL(checked.url).copy_with(host=str(address))
    default_port = 443 if checked.scheme == "https" else 80
    host_header = checked.host if ":" not in checked.host else f"[{checked.host}]"
    if checked.port != default_port:
        host_header += f":{checked.port}"
    extensions = {"sni_hostname": checked.host} if checked.scheme == "https" else {}
    deadline = time.monotonic() + total_timeout
    timeout = httpx.Timeout(total_timeout, connect=min(connect_timeout, total_timeout))
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False,
                      verify=_ssl_context() if verify is None else verify) as client:
        request = client.build_request(method, target, content=content,
                                       headers={**(headers or {}), "Host": host_header},
                                       extensions=extensions)
        response = client.send(request, stream=True)
        try:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise ResponseTooLarge(max_bytes)
                if time.monotonic() > deadline:
                    raise TotalTimeout(total_timeout)
            if time.monotonic() > deadline:
                raise TotalTimeout(total_timeout)
        finally:
            response.close()
    return GuardedResponse(response.status_code, dict(response.headers), bytes(body), str(address))


def guarded_get(url: str | CheckedURL, *, policy: NetPolicy, **kw) -> GuardedResponse:
    return guarded_request("GET", url, policy=policy, **kw)


def guarded_post(url: str | CheckedURL, *, policy: NetPolicy, content: bytes, **kw) -> GuardedResponse:
    return guarded_request("POST", url, policy=policy, content=content, **kw)
