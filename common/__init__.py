"""Code both ends share: the wire protocol, crypto, SOCKS5 codec, socket helpers, relay engines."""
