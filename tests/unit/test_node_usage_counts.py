"""Request-side evidence: the client addresses the front saw, kept for 24 h, mapped to the nodes a mirror selects."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from regmirror.cache.clients import WINDOW_SECONDS, ClientsSeen, parse_addresses
from regmirror.nodeusage import NodeAddresses, NodeLocator, usage


def rfc(ts: float) -> str:
    return f"t{ts:.0f}"


def node(name: str, ip: str, pod_cidr: str | None = None, external: str | None = None) -> dict[str, object]:
    addresses = [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]
    if external:
        addresses.append({"type": "ExternalIP", "address": external})
    spec = {"podCIDRs": [pod_cidr]} if pod_cidr else {}
    return {"metadata": {"name": name}, "spec": spec, "status": {"addresses": addresses}}


def test_varnishncsa_lines_become_canonical_addresses_and_garbage_is_skipped() -> None:
    text = "10.0.0.1\n10.0.0.1\n::ffff:10.0.0.2\n2001:DB8::1\n-\nnot an address\n\n192.168.1.300\n"
    assert parse_addresses(text) == {"10.0.0.1", "::ffff:a00:2", "2001:db8::1"}


def test_an_address_is_kept_for_the_window_then_forgotten() -> None:
    seen = ClientsSeen()
    assert seen.observe({"10.0.0.1", "10.0.0.2"}, 1000.0)
    assert not seen.observe({"10.0.0.1", "10.0.0.2"}, 1000.0), "the same read again changes nothing"
    seen.observe({"10.0.0.1"}, 1000.0 + WINDOW_SECONDS)
    assert seen.summary(1000.0 + WINDOW_SECONDS + 1, rfc)["seen"] == [{"address": "10.0.0.1", "lastSeen": rfc(1000.0 + WINDOW_SECONDS)}]
    restored = ClientsSeen({"10.0.0.3": 5.0, "junk": 1.0, "10.0.0.4": "x"})  # what a state file may hold
    assert restored.seen == {"10.0.0.3": 5.0}


def test_usage_maps_node_addresses_and_masqueraded_pod_network_addresses() -> None:
    nodes = [
        node("a", "192.168.0.1", "10.244.1.0/24"),
        node("b", "192.168.0.2", "10.244.2.0/24"),
        node("c", "192.168.0.3", "10.244.3.0/24", external="203.0.113.3"),
        node("d", "192.168.0.4"),
    ]
    replica_1 = {"clients": {"windowSeconds": 86400, "seen": [{"address": "192.168.0.1", "lastSeen": "x"}]}}
    # kube-proxy masquerades a node's connection to an endpoint on the same node: its cni gateway.
    replica_2 = {"clients": {"windowSeconds": 86400, "seen": [{"address": "10.244.2.1"}, {"address": "203.0.113.3"}, {"bogus": 1}]}}
    assert usage(nodes, [replica_1, replica_2]) == {"pulledRecently": 3, "notPulledRecently": ["d"]}
    assert usage(nodes, [{"hits": 3}, {}]) is None, "no replica reported clients: unknown, not 'nobody pulled'"
    assert usage(nodes, [{"clients": {"seen": []}}]) == {"pulledRecently": 0, "notPulledRecently": ["a", "b", "c", "d"]}


@given(st.lists(st.integers(1, 250), unique=True, max_size=40), st.sets(st.integers(1, 250), max_size=40))
def test_usage_counts_exactly_the_selected_nodes_seen(selected: list[int], pulling: set[int]) -> None:
    nodes = [node(f"n{i}", f"192.168.0.{i}") for i in selected]
    stats = [{"clients": {"seen": [{"address": f"192.168.0.{i}"} for i in sorted(pulling)]}}]
    result = usage(nodes, stats)
    assert result is not None
    assert result["pulledRecently"] == len(set(selected) & pulling)
    missing = sorted(f"n{i}" for i in selected if i not in pulling)
    assert result["notPulledRecently"] == missing[:5]


@given(
    st.lists(st.tuples(st.integers(0, 30), st.sampled_from([None, 24, 25, 26])), unique_by=lambda t: t[0], max_size=20),
    st.sets(st.tuples(st.integers(0, 31), st.integers(0, 255)), max_size=30),
    st.sets(st.integers(0, 40), max_size=10),
)
def test_the_locator_finds_exactly_the_nodes_a_scan_of_every_node_finds(
    nodes: list[tuple[int, int | None]], pod_clients: set[tuple[int, int]], node_clients: set[int]
) -> None:
    """NodeLocator (one dict lookup per address and prefix length) against the plain definition:
    a node pulled if one of its addresses, or an address in its pod network, is among the clients."""
    # Node i: address 192.168.0.i, pod network 10.244.i.0/prefix (distinct networks, as a cluster has).
    parsed = [NodeAddresses.of(f"n{i}", [f"192.168.0.{i}"], [f"10.244.{i}.0/{p}"] if p else []) for i, p in nodes]
    clients = {ipaddress.ip_address(f"10.244.{a}.{b}") for a, b in pod_clients} | {
        ipaddress.ip_address(f"192.168.0.{i}") for i in node_clients
    }
    scanned = {n.name for n in parsed if n.addresses & clients or any(c in net for c in clients for net in n.pod_cidrs)}
    assert NodeLocator(parsed).nodes_of(clients) == scanned
