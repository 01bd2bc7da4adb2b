"""A network namespace of its own for one test "host", joined to the machine by a veth pair.

The host reaches the machine at `host_ip` (the root side of the pair) and only there: a Redis bound
to `host_ip` is reachable, and anything on 127.0.0.1 is not. A Unix socket is a file, not a network
address, so the embedded PostgreSQL stays reachable through its socket whatever happens here.
`cut()` takes the root side of the link down: packets go nowhere, with no error to either side, as
in a real partition, and TCP retransmits until `heal()`.

Creating one needs root (CAP_NET_ADMIN) and `ip` (iproute2); `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str, namespace: str | None = None) -> str:
    command = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why no namespace can be made here, or None if one can."""
    if shutil.which("ip") is None or shutil.which("ss") is None:
        return "`ip` and `ss` (iproute2) are not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    probe = f"mfprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"this machine does not allow network namespaces: {exc}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Namespace:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    # A /30 of 10.231.0.0/16, so that tests running at once on one machine rarely meet.
    subnet: int = field(default_factory=lambda: random.randrange(0, 65536, 4))

    @property
    def name(self) -> str:
        return f"mf-{self.tag}"

    @property
    def host_ip(self) -> str:
        """The machine's address, as seen from inside the namespace."""
        return f"10.231.{self.subnet // 256}.{self.subnet % 256 + 1}"

    @property
    def inner_ip(self) -> str:
        return f"10.231.{self.subnet // 256}.{self.subnet % 256 + 2}"

    @property
    def _outer_link(self) -> str:
        return f"mf{self.tag}o"

    def create(self) -> Namespace:
        inner = f"mf{self.tag}i"
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self._outer_link, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self._outer_link)
            _ip("link", "set", self._outer_link, "up")
            _ip("addr", "add", f"{self.inner_ip}/30", "dev", inner, namespace=self.name)
            _ip("link", "set", inner, "up", namespace=self.name)
            _ip("link", "set", "lo", "up", namespace=self.name)
        except BaseException:
            self.delete()
            raise
        return self

    def command(self, argv: list[str]) -> list[str]:
        """`argv`, run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        _ip("link", "set", self._outer_link, "down")

    def heal(self) -> None:
        _ip("link", "set", self._outer_link, "up")

    def unsent(self) -> list[str]:
        """TCP connections inside the namespace with bytes their peer has not acknowledged yet
        (closed ones included: the kernel still delivers what they sent)."""
        done = subprocess.run(self.command(["ss", "-tnaH"]), capture_output=True, text=True, timeout=30)
        pending = []
        for line in done.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] != "LISTEN" and (fields[2] != "0" or fields[0] == "SYN-SENT"):
                pending.append(line)
        return pending

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self._outer_link], capture_output=True, timeout=30)
