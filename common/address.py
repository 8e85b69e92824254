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

# RFC 1035 section 2.3.4: a label is at most 63 octets and a name at most 255 octets in its wire
# form (length bytes and the root label included), which is 253 characters of text without the
# trailing dot. What Python's "idna" codec (used by getaddrinfo) and resolvers refuse must fail
# here, where the peer can be told, not later in a lookup.
MAX_LABEL_LEN = 63
MAX_NAME_LEN = 253
# Letters, digits and hyphen (RFC 1123 section 2.1), and underscore, which service names
# (`_sip._tcp`, RFC 2782) and some real host names carry and getaddrinfo resolves.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")

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
            why = name_problem(_ascii_name(self.host))
            if why is not None:
                raise UsageError(f"invalid host name {self.host!r}: {why}")

    @property
    def is_domain(self) -> bool:
        return isinstance(self.host, str)

    @classmethod
    def parse(
        cls, text: str, default_port: int | None = None, *, any_port: bool = False
    ) -> Address:
        """Parse `host:port`, `1.2.3.4:port` or `[2001:db8::1]:port` (the port may be defaulted;
        `any_port` also takes port 0, for a listener whose port the kernel picks)."""
        text = text.strip()
        host, port = _split_host_port(text, default_port, any_port)
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
        name = _ascii_name(self.host).encode("ascii")
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


class InvalidName(ProtocolError):
    """A domain target whose framing is sound but whose name no resolver takes (`a..b`, a label
    of 64 characters): the request can be answered, unlike one whose bytes do not parse."""

    status = Status.ADDRESS

    def __init__(self, name: str, port: int, why: str, end: int) -> None:
        super().__init__(f"invalid target name {name!r}: {why}")
        self.name = name  # the name as received, printable (other bytes as \\xHH)
        self.port = port
        self.why = why
        self.end = end  # offset after the address, as `decode` would return it


def name_problem(name: str) -> str | None:
    """Why `name` (ASCII text form) is not a host name a target may carry, or None if it is.

    An IP literal sent as a name (SOCKS clients do that) is passed on as today; otherwise
    labels of 1-63 letters, digits, `-` or `_`, at most 253 characters, one trailing dot allowed.
    """
    if "%" not in name:  # no IPv6 scope: Python takes any text after the '%'
        try:
            ipaddress.ip_address(name)
            return None
        except ValueError:
            pass
    text = name[:-1] if name.endswith(".") else name
    if not text:
        return "empty name"
    if len(text) > MAX_NAME_LEN:
        return f"{len(text)} characters (at most {MAX_NAME_LEN}, RFC 1035)"
    for label in text.split("."):
        if not label:
            return "empty label"
        if len(label) > MAX_LABEL_LEN:
            return f"label of {len(label)} characters (at most {MAX_LABEL_LEN}, RFC 1035)"
        bad = next((c for c in label if c not in _NAME_CHARS), None)
        if bad is not None:
            return f"character {bad!r} (letters, digits, '-', '_' and '.' only)"
    return None


def _ascii_name(host: str) -> str:
    """The ASCII form of a name: itself, or IDNA (punycode) for international names."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise UsageError(f"invalid host name {host!r}: not a valid IDNA name") from None


def ip_or_name(host: str) -> str | IPAddress:
    """An `ipaddress` object when `host` is a literal IP address, else the name itself."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or any(c in host for c in " /\\[]@") or host.startswith("-"):
        raise UsageError(f"not a host name or IP address: {host!r}")
    return host


def _split_host_port(
    text: str, default_port: int | None, any_port: bool = False
) -> tuple[str, int]:
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
    lowest = 0 if any_port else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 0xFFFF:
        raise UsageError(f"bad address {text!r}: port must be {lowest}-65535")
    return host, int(port_text)


def decode(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Address, int] | None:
    """Decode a SOCKS5-form address at `offset`.

    Returns (address, offset after it), or None when `buf` ends before the address does.
    Raises ProtocolError(ADDRESS) on an unknown ATYP, and its subclass `InvalidName` on a
    complete domain address whose name `name_problem` refuses.
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
        port = int.from_bytes(buf[end : end + 2], "big")
        text = raw.decode("ascii", "backslashreplace")
        why = "bytes that are not ASCII" if not raw.isascii() else name_problem(text)
        if why is not None:
            shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
            raise InvalidName(shown, port, why, end + 2)
        host = text
    else:
        raise ProtocolError(f"unknown address type {atyp:#x}", Status.ADDRESS)
    port = int.from_bytes(buf[end : end + 2], "big")
    return Address(host, port), end + 2


def format_sockaddr(sa: tuple) -> str:
    """`host:port` for a socket address tuple, with IPv6 in brackets."""
    host = str(sa[0])
    return f"[{host}]:{sa[1]}" if ":" in host else f"{host}:{sa[1]}"
