"""mptun: a multipath TCP tunnel for routers.

The code lives in one namespace mapped onto the repository's folders: `mptun.common` (protocol,
crypto, sockets, relay engines), `mptun.client` (router side), `mptun.server` (VPS side) and this
package (the command line and the tools built from the three).
"""

__version__ = "0.1.0"
