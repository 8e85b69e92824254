"""Target addresses: the SOCKS5 ATYP wire form (RFC 1928 section 5) and `HOST:PORT` strings;
the IP address and network types both ends share, and the parser of CIDR lists.

The tunnel carries targets in exactly the form a SOCKS5 request does, so the client can copy a
SOCKS request's address into the tunnel header without interpreting it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from mptun.common.errors import ConfigError, ProtocolError, Status, UsageError

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(
    values: Iterable[str], what: str, expected: str = "an address or CIDR"
) -> list[IPNetwork]:
    """Addresses and CIDRs as networks (host bits ignored, an address is its /32 or /128).

    The first value that is neither raises `ConfigError("{what}: not {expected}: 'value'")`:
    `what` names the option, `expected` what it takes.
    """
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{what}: not {expected}: {v!r}") from None
    return out


@dataclass(frozen=True, slots=True)
class Address:
    """A target: an IP address or a domain name, and a port."""

    host: str | IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise UsageError(f"port out of range: {self.port}")
        if isinstance(self.host, str):
            raw = self.host.encode("idna") if not self.host.isascii() else self.host.encode()
            if not 0 < len(raw) <= 255:
                raise UsageError(f"domain name must be 1-255 bytes: {self.host!r}")

    @property
    def is_domain(self) -> bool:
        return isinstance(self.host, str)

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Address:
        """Parse `host:port`, `1.2.3.4:port` or `[2001:db8::1]:port` (the port may be defaulted)."""
        text = text.strip()
        host, port = _split_host_port(text, default_port)
        try:
            return cls(ip_or_name(host), port)
        except UsageError as e:
            raise UsageError(f"bad address {text!r}: {e}") from None

    def encode(self) -> bytes:
        """The SOCKS5 form: ATYP, address, port (big-endian)."""
        port = self.port.to_bytes(2, "big")
        if isinstance(self.host, ipaddress.IPv4Address):
            return bytes([ATYP_IPV4]) + self.host.packed + port
        if isinstance(self.host, ipaddress.IPv6Address):
            return bytes([ATYP_IPV6]) + self.host.packed + port
        name = self.host.encode("idna") if not self.host.isascii() else self.host.encode()
        return bytes([ATYP_DOMAIN, len(name)]) + name + port

    def sockaddr(self) -> tuple:
        """The tuple `socket.connect` takes for an IP address (not for names)."""
        if isinstance(self.host, ipaddress.IPv6Address):
            return (str(self.host), self.port, 0, 0)
        return (str(self.host), self.port)

    def __str__(self) -> str:
        if isinstance(self.host, ipaddress.IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def ip_or_name(host: str) -> str | IPAddress:
    """An `ipaddress` object when `host` is a literal IP address, else the name itself."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or any(c in host for c in " /\\[]@") or host.startswith("-"):
        raise UsageError(f"not a host name or IP address: {host!r}")
    return host


def _split_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UsageError(f"bad address {text!r}: expected ':' after ']'")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"bad address {text!r}: not an IPv6 address in brackets") from None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise UsageError(f"bad address {text!r}: write IPv6 addresses as [2001:db8::1]:port")
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) <= 0xFFFF:
        raise UsageError(f"bad address {text!r}: port must be 1-65535")
    return host, int(port_text)


def decode(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Address, int] | None:
    """Decode a SOCKS5-form address at `offset`.

    Returns (address, offset after it), or None when `buf` ends before the address does.
    Raises ProtocolError(ADDRESS) on an unknown ATYP or an empty/invalid domain.
    """
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    if atyp == ATYP_IPV4:
        end = offset + 1 + 4
        if len(buf) < end + 2:
            return None
        host: str | IPAddress = ipaddress.IPv4Address(bytes(buf[offset + 1 : end]))
    elif atyp == ATYP_IPV6:
        end = offset + 1 + 16
        if len(buf) < end + 2:
            return None
        host = ipaddress.IPv6Address(bytes(buf[offset + 1 : end]))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < offset + 2:
            return None
        n = buf[offset + 1]
        end = offset + 2 + n
        if len(buf) < end + 2:
            return None
        raw = bytes(buf[offset + 2 : end])
        if n == 0 or not all(0x21 <= b < 0x7F for b in raw):
            raise ProtocolError("invalid domain name in address", Status.ADDRESS)
        host = raw.decode("ascii")
    else:
        raise ProtocolError(f"unknown address type {atyp:#x}", Status.ADDRESS)
    port = int.from_bytes(buf[end : end + 2], "big")
    return Address(host, port), end + 2


def format_sockaddr(sa: tuple) -> str:
    """`host:port` for a socket address tuple, with IPv6 in brackets."""
    host = str(sa[0])
    return f"[{host}]:{sa[1]}" if ":" in host else f"{host}:{sa[1]}"
