"""free_port: a port no one is handed by the kernel or by Ray's worker pool, and bindable now."""

import socket

from mixserve.workers.ports import _gap, free_port


def test_free_ports_come_from_the_gap_below_the_ephemeral_range_and_bind():
    low, high = _gap()
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    assert 20000 <= low <= high < ephemeral_low
    for _ in range(20):
        port = free_port()
        assert low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_someone_holds_is_never_returned(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr("mixserve.workers.ports._gap", lambda: (taken, taken))
        assert all(free_port() != taken for _ in range(10))
