"""Run many `mptun` invocations fast: a clean interpreter imports mptun once, then forks one
child per invocation, which runs the same entry point `python -m mptun` runs (`main()` with
sys.argv, the given environment, stdin/stdout on /dev/null, stderr to a file).

Each child is a real process with its own exit status, as a shell would see it; only the
~0.3 s of imports per invocation is saved (the sweep runs hundreds). The zygote itself is not
pytest: no pytest logging handlers, signal handlers or capture leak into the children. With root,
it runs in a network namespace of its own (loopback up, nothing else), so an invocation that
wrongly accepted its input cannot touch this machine's network or collide with anyone's ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SCRIPT = r"""
import json, os, signal, sys, time
import mptun.cli
mptun.cli.cli.all_commands()  # import every command once, before any fork
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.setsid()
            fd = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.environ.clear()
            os.environ.update(req["env"])
            if req["user"]:
                import pwd
                pw = pwd.getpwnam(req["user"])
                os.setgroups([])
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
            sys.argv = ["mptun", *req["argv"]]
            mptun.cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except Exception:
                    pass
            os._exit(code)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            result = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            result = "timeout"
            break
        time.sleep(0.002)
    sys.stdout.write(json.dumps({"status": result}) + "\n")
    sys.stdout.flush()
"""


class Zygote:
    """One pre-imported interpreter; `run()` one invocation at a time (thread-safe)."""

    def __init__(self, private_netns: bool) -> None:
        argv = [sys.executable, "-c", SCRIPT]
        if private_netns:
            argv = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MPTUN_")}
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environ
        )
        self.lock = threading.Lock()
        self.dir = Path(tempfile.mkdtemp(prefix="mptun-zygote-"))

    def run(
        self, argv: list[str], env: dict[str, str], timeout: float, user: str | None = None
    ) -> tuple[int | str, str]:
        """(exit status or "timeout", stderr) of `mptun ARGV` with exactly this environment."""
        with self.lock:
            err = self.dir / "stderr"
            req = {"argv": argv, "env": env, "timeout": timeout, "user": user, "stderr": str(err)}
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"zygote exited with {self.proc.wait()}")
            return json.loads(line)["status"], err.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
