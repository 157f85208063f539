"""A point-to-point link between the host's network namespace and another, made of two TUN devices
and a relay in this process that delays every packet by a fixed time and drops a share of them at
random (seeded): what `tc qdisc add ... netem delay D loss P` does to a veth pair, for kernels
built without netem. Packets are IP datagrams (IFF_TUN, no packet information header); the delay
is a line, not a rate limit: packets that leave together arrive together, D later."""

from __future__ import annotations

import collections
import fcntl
import os
import random
import select
import struct
import subprocess
import threading
import time
from types import TracebackType

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
POLL_S = 0.2  # how often an idle reader checks whether the link was closed


def _tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _sh(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {done.stderr.strip()}")


class _Direction:
    """Packets read from one device, written to the other `delay_s` after they were read."""

    def __init__(self, src: int, dst: int, delay_s: float, loss: float, seed: int) -> None:
        self.src, self.dst, self.delay_s, self.loss = src, dst, delay_s, loss
        self.rng = random.Random(seed)
        self.line: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        self.closed = False
        self.packets = self.dropped = 0

    def read(self) -> None:
        while not self.closed:
            if not select.select([self.src], [], [], POLL_S)[0]:
                continue
            try:
                packet = os.read(self.src, 65536)
            except OSError:  # the device went away: the link is closed
                break
            self.packets += 1
            if self.rng.random() < self.loss:
                self.dropped += 1
                continue
            with self.ready:
                self.line.append((time.monotonic() + self.delay_s, packet))
                self.ready.notify()
        self.close()

    def write(self) -> None:
        while True:
            with self.ready:
                self.ready.wait_for(lambda: self.line or self.closed)
                if self.closed:
                    return
                due, packet = self.line.popleft()
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            try:
                os.write(self.dst, packet)
            except OSError:
                return

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify_all()


class LossyLink:
    """`host_address` on device `prefix`a in this namespace, `ns_address` on `prefix`b in
    namespace `netns` (which must exist), each the other's peer; closing removes both devices."""

    def __init__(self, prefix: str, netns: str, host_address: str, ns_address: str, delay_s: float,
                 loss: float, seed: int = 0) -> None:
        outer, inner = f"{prefix}a", f"{prefix}b"
        self._fds = [_tun(outer), _tun(inner)]
        try:
            _sh("ip", "link", "set", inner, "netns", netns)
            _sh("ip", "addr", "add", host_address, "peer", ns_address, "dev", outer)
            _sh("ip", "link", "set", outer, "up")
            _sh("ip", "netns", "exec", netns, "ip", "addr", "add", ns_address, "peer", host_address, "dev", inner)
            _sh("ip", "netns", "exec", netns, "ip", "link", "set", inner, "up")
        except OSError:
            self.close()
            raise
        a, b = self._fds
        self.directions = [_Direction(a, b, delay_s, loss, seed), _Direction(b, a, delay_s, loss, seed + 1)]
        self._threads = [threading.Thread(target=fn, daemon=True, name=f"lossy-link-{fn.__name__}")
                         for d in self.directions for fn in (d.read, d.write)]
        for thread in self._threads:
            thread.start()

    @property
    def packets(self) -> int:
        return sum(d.packets for d in self.directions)

    @property
    def dropped(self) -> int:
        return sum(d.dropped for d in self.directions)

    def close(self) -> None:
        for d in getattr(self, "directions", ()):
            d.close()
        for thread in getattr(self, "_threads", ()):
            thread.join(5)
        for fd in self._fds:  # the devices go with their last descriptor
            os.close(fd)
        self._fds = []

    def __enter__(self) -> LossyLink:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
