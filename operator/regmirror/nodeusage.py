"""PURE: which selected nodes pulled through a mirror lately, from the client addresses its front saw.

The cache sidecar of each mirror replica lists the addresses that made pulls
in the last 24 h (`/stats` -> `clients`, cache/clients.py). A node reaches a
mirror's ClusterIP from its own network namespace, so the address the front
sees is one of the node's `status.addresses` (InternalIP, ExternalIP), or,
when kube-proxy masquerades the connection to an endpoint on the same node,
the node's own gateway in its pod CIDR (`spec.podCIDRs`). This module maps
addresses to nodes and gives the figures for `status.nodes`:

- `pulledRecently`: how many selected nodes were seen pulling;
- `notPulledRecently`: a few selected nodes that were not. Such a node is
  idle (it started nothing new), or its runtime bypasses the mirror: its
  agent's preflight (Events on the Node, /report) says which.

The operator's status.cache poll (controller/cache.py) turns each replica's
`clients` into node names with a `NodeLocator` built once per poll round (an
address seen by any replica counts), and the status reconciler counts the
selected nodes among them (`counts`). `usage` does both for one set of
documents.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_NAMED = 5
ADDRESS_TYPES = ("InternalIP", "ExternalIP")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class NodeAddresses:
    """One node's name, addresses and pod networks, as read from the Node object."""

    name: str
    addresses: frozenset[Address]
    pod_cidrs: tuple[Network, ...]

    @classmethod
    def of(cls, name: str, addresses: Iterable[object], pod_cidrs: Iterable[object]) -> NodeAddresses:
        """From address and CIDR strings (malformed ones are skipped)."""
        parsed: set[Address] = set()
        for address in addresses:
            try:
                parsed.add(ipaddress.ip_address(str(address)))
            except ValueError:
                continue
        networks = []
        for cidr in pod_cidrs:
            try:
                networks.append(ipaddress.ip_network(str(cidr), strict=False))
            except ValueError:
                continue
        return cls(name, frozenset(parsed), tuple(networks))

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> NodeAddresses:
        """From a Node object (malformed entries are skipped)."""
        name = str((node.get("metadata") or {}).get("name", ""))
        entries = (node.get("status") or {}).get("addresses") or []
        addresses = [e.get("address") for e in entries if isinstance(e, Mapping) and e.get("type") in ADDRESS_TYPES]
        return cls.of(name, addresses, pod_cidrs(node.get("spec") or {}))


def pod_cidrs(spec: Mapping[str, Any]) -> list[str]:
    """A Node spec's pod networks (`podCIDRs`, or the older single `podCIDR`)."""
    return [str(c) for c in spec.get("podCIDRs") or []] or ([str(spec["podCIDR"])] if spec.get("podCIDR") else [])


class NodeLocator:
    """Client address -> node name, for many lookups: a node's own addresses exactly, its pod
    networks by prefix (one dict per prefix length, so a lookup does not scan the nodes)."""

    def __init__(self, nodes: Iterable[NodeAddresses]) -> None:
        self._exact: dict[Address, str] = {}
        self._networks: dict[tuple[int, int], dict[Network, str]] = {}
        for node in nodes:
            for address in node.addresses:
                self._exact.setdefault(address, node.name)
            for net in node.pod_cidrs:
                self._networks.setdefault((net.version, net.prefixlen), {}).setdefault(net, node.name)

    def locate(self, address: Address) -> str | None:
        """The node an address belongs to, or None."""
        name = self._exact.get(address)
        if name is not None:
            return name
        for (version, prefix), networks in self._networks.items():
            if address.version == version:
                name = networks.get(ipaddress.ip_network((address, prefix), strict=False))
                if name is not None:
                    return name
        return None

    def nodes_of(self, clients: Iterable[Address]) -> frozenset[str]:
        """Names of the nodes among which the clients are."""
        return frozenset(name for name in map(self.locate, clients) if name is not None)


def clients_of(stats: Iterable[Mapping[str, Any]]) -> set[Address]:
    """Every address any replica's sidecar saw pulling (`/stats` documents; malformed parts skipped)."""
    seen: set[Address] = set()
    for doc in stats:
        block = doc.get("clients") if isinstance(doc, Mapping) else None
        for entry in (block or {}).get("seen") or [] if isinstance(block, Mapping) else []:
            try:
                seen.add(ipaddress.ip_address(str(entry.get("address"))))
            except (ValueError, AttributeError):
                continue
    return seen


def reports_clients(doc: object) -> bool:
    """Whether a /stats document carries a `clients` block (a sidecar behind a front does)."""
    return isinstance(doc, Mapping) and isinstance(doc.get("clients"), Mapping)


def counts(selected: Iterable[str], seen: frozenset[str], max_named: int = MAX_NAMED) -> dict[str, Any]:
    """`status.nodes` figures: {"pulledRecently": n, "notPulledRecently": [a few names, sorted]}."""
    chosen = set(selected)
    return {"pulledRecently": len(chosen & seen), "notPulledRecently": sorted(chosen - seen)[:max_named]}


def usage(selected: Iterable[Mapping[str, Any]], stats: Iterable[Mapping[str, Any]], max_named: int = MAX_NAMED) -> dict[str, Any] | None:
    """`counts` for Node objects and /stats documents; None without evidence.

    None when no replica reported clients at all (a mirror without a front,
    or no sidecar answered): unknown is not "nobody pulled".
    """
    docs = list(stats)
    if not any(reports_clients(d) for d in docs):
        return None
    nodes = [NodeAddresses.from_node(n) for n in selected]
    seen = NodeLocator(nodes).nodes_of(clients_of(docs))
    return counts((n.name for n in nodes), seen, max_named)
