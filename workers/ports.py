"""A TCP port that was free a moment ago, for rendezvous and test/benchmark servers.

Rule: bind port 0 on the host, read the port the OS chose, release it. Another process may take
it before the caller binds, so use it at once (gloo's rendezvous, a server started right after).
"""

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
