"""The commands of `mptun` (click): each maps its options onto a side's plain settings
(`mptun.client.app`, `mptun.server.app`) and runs what the side builds from them.

Click lives only here and in the tools (bench, demo); `client/`, `server/` and `common/` never
import it (tests/test_architecture.py).
"""
