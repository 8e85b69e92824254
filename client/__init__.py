"""The router side: listeners (SOCKS5, redirect, forward) sharing one dial-handshake-relay path."""
