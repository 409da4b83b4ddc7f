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

The operator gathers the sidecars' `clients` of every replica (an address
seen by any of them counts), and calls `usage` with the nodes the mirror
selects.
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
    def from_node(cls, node: Mapping[str, Any]) -> NodeAddresses:
        """From a Node object (malformed entries are skipped)."""
        name = str((node.get("metadata") or {}).get("name", ""))
        addresses: set[Address] = set()
        for entry in (node.get("status") or {}).get("addresses") or []:
            if isinstance(entry, Mapping) and entry.get("type") in ADDRESS_TYPES:
                try:
                    addresses.add(ipaddress.ip_address(str(entry.get("address"))))
                except ValueError:
                    continue
        spec = node.get("spec") or {}
        cidrs = list(spec.get("podCIDRs") or []) or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        networks = []
        for cidr in cidrs:
            try:
                networks.append(ipaddress.ip_network(str(cidr), strict=False))
            except ValueError:
                continue
        return cls(name, frozenset(addresses), tuple(networks))


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


def nodes_seen(nodes: Iterable[NodeAddresses], clients: set[Address]) -> set[str]:
    """Names of the nodes one of whose addresses (or pod-network addresses) is among the clients."""
    seen = set()
    for node in nodes:
        if node.addresses & clients or any(c in net for c in clients for net in node.pod_cidrs):
            seen.add(node.name)
    return seen


def usage(selected: Iterable[Mapping[str, Any]], stats: Iterable[Mapping[str, Any]], max_named: int = MAX_NAMED) -> dict[str, Any] | None:
    """`status.nodes` figures: {"pulledRecently": n, "notPulledRecently": [a few names]}; None without evidence.

    None when no replica reported clients at all (a mirror without a front,
    or no sidecar answered): unknown is not "nobody pulled".
    """
    docs = list(stats)
    if not any(isinstance(d, Mapping) and isinstance(d.get("clients"), Mapping) for d in docs):
        return None
    nodes = [NodeAddresses.from_node(n) for n in selected]
    seen = nodes_seen(nodes, clients_of(docs))
    missing = sorted(n.name for n in nodes if n.name not in seen)
    return {"pulledRecently": len(seen), "notPulledRecently": missing[:max_named]}
