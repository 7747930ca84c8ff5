"""A TCP port that is free now and that nothing hands out by itself, for rendezvous and servers.

Rule: draw ports at random from the gap between Ray's worker ports (10002-19999 by default) and the
kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default), and
return the first one a bind succeeds on. Ports the kernel picks for outgoing connections and for
`bind(0)` (Ray's own servers, every client socket) come from the ephemeral range, so a port from
the gap stays free between this check and the caller's bind unless someone binds it by number.
"""

import random
import socket

GAP = (20000, 32767)  # first and last port, both inclusive
ATTEMPTS = 64


def _gap() -> tuple[int, int]:
    """GAP, its top lowered below the ephemeral range where the kernel's range starts lower."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = GAP[1] + 1
    return GAP[0], max(GAP[0], min(GAP[1], ephemeral_low - 1))


def free_port(host: str = "127.0.0.1") -> int:
    low, high = _gap()
    for _ in range(ATTEMPTS):
        port = random.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded gap: any port the kernel gives
        s.bind((host, 0))
        return s.getsockname()[1]
