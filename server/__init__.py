"""The VPS side: accept, authenticate (absorbing failures), dial under a target policy, relay."""
