"""The network interface that holds an IPv4 address of this host, so gloo talks over it.

Rule: gloo connects a replica's ranks over the interface named in GLOO_SOCKET_IFNAME, else over the
address this host's name resolves to, which on many hosts is loopback (/etc/hosts maps the name to
127.0.0.1 or 127.0.1.1). A rank on another host then dials loopback and the mesh never forms ("Gloo
connectFullMesh failed ... remote=[127.0.0.1]"). So each rank names the interface that holds its own
Ray node IP, the address its peers reach it at; a GLOO_SOCKET_IFNAME the user set wins.
"""

import fcntl
import socket
import struct

SIOCGIFADDR = 0x8915  # Linux: an interface's (first) IPv4 address


def interface_with_address(address: str) -> str | None:
    """The name of the interface whose IPv4 address is `address`, or None if none is (or this OS
    cannot say)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    for name in names:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
        if socket.inet_ntoa(packed[20:24]) == address:
            return name
    return None
