"""The lab: network namespaces, the multipath test bed, the rig that runs mptun on it and a
checked traffic peer. Used by `mptun demo`, `mptun bench` and the tests; never by the client
or the server, and left out of the router package."""
