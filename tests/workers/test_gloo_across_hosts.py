"""Two ranks on two "hosts" (network namespaces joined by a veth pair, each with its own address) sum a
tensor with GlooCommunicator: each names the interface that holds its own address
(workers/network_interface.py). Where this host's name resolves to loopback, the same pair without the
interface fails: gloo hands its peer a loopback address."""

import os
import random
import shutil
import socket
import subprocess
import sys
import time

import pytest

from mixserve.workers.network_interface import interface_with_address

RANK = r"""
import sys, torch
from mixserve.workers.communicator import GlooCommunicator
from mixserve.workers.network_interface import interface_with_address
rank, own, rendezvous, name_it, timeout_s = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1", float(sys.argv[5])
comm = GlooCommunicator(rendezvous, rank, 2, timeout_s=timeout_s,
                        interface=interface_with_address(own) if name_it else None)
t = torch.full((4,), float(rank + 1))
print("sum", comm.all_reduce(t).tolist(), flush=True)
comm.close()
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces")
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    a, b = f"mxs-a{tag}", f"mxs-b{tag}"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    hosts = [(a, f"{subnet}.1", f"va{tag}"), (b, f"{subnet}.2", f"vb{tag}")]
    made = []
    try:
        for ns, _, _ in hosts:
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", hosts[0][2], "type", "veth", "peer", "name", hosts[1][2])
        for ns, address, veth in hosts:
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns in made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:  # only what this test started runs there
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its veth end goes with it


def _all_reduce(hosts, name_interfaces: bool, timeout_s: float = 60.0) -> list[subprocess.CompletedProcess]:
    rendezvous = f"{hosts[0][1]}:{random.randrange(20000, 30000)}"
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-P", "-c", RANK, str(rank), address,
                               rendezvous, "1" if name_interfaces else "0", str(timeout_s / 3)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"})
             for rank, (ns, address, _) in enumerate(hosts)]
    deadline = time.monotonic() + timeout_s
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def test_the_loopback_interface_is_found_by_its_address():
    assert interface_with_address("127.0.0.1") == "lo"
    assert interface_with_address("192.0.2.123") is None  # TEST-NET-1: no interface here holds it


def test_two_ranks_on_two_hosts_sum_over_the_interfaces_holding_their_addresses(two_hosts):
    results = _all_reduce(two_hosts, name_interfaces=True)
    for rc, text in results:
        assert rc == 0, text
        assert "sum [3.0, 3.0, 3.0, 3.0]" in text, text


def test_without_the_interface_the_ranks_dial_loopback_and_fail(two_hosts):
    if not socket.gethostbyname(socket.gethostname()).startswith("127."):
        pytest.skip("this host's name does not resolve to loopback: gloo's own guess works here")
    results = _all_reduce(two_hosts, name_interfaces=False, timeout_s=12)
    assert any(rc != 0 for rc, _ in results), results
