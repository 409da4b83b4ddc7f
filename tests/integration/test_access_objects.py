"""Who may pull, on a real API server (kwok nodes): the NetworkPolicy, the external Service and the access Secrets.

The objects are rendered exactly as the operator renders them (children of a
Restricted mirror with access clients and an external LoadBalancer, its
access decision's Secrets, the node plan naming the credential's revision,
the agent's DaemonSet) and applied with server-side apply; owner references
are dropped (the owner is not created here). What the API server stores is
what a user sees: the policy admitted as rendered (a second apply changes
nothing), the pods scheduled and running with the Secret volumes, and no
credential anywhere but in Secrets.

The operator does not create these yet (the core that will is being rebuilt):
the same search runs against the operator's own writes once it does.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from harness import LocalCluster
from regmirror import access as acc
from regmirror import constants as c
from regmirror.models import RegistryMirrorSpec
from regmirror.nodeplan import build_node_plan, mirror_entry
from regmirror.render.access import render_auth_secret, render_client_secret, render_node_auth_secret
from regmirror.render.agent import render_agent_daemonset, render_node_config_map
from regmirror.render.mirror import external_service_name, operator_pod_selector, render_mirror_children

MIRROR = "private"
UID = "00000000-0000-0000-0000-000000000000"


def spec() -> RegistryMirrorSpec:
    return RegistryMirrorSpec.model_validate(
        {
            "upstream": {"url": "https://quay.io", "credentialsSecretRef": {"name": "quay-creds"}},
            "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24"]},
            "access": {
                "clients": [{"name": "ci"}],
                "networkPolicy": {
                    "from": [
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
                        {"cidr": "10.20.0.0/16"},
                    ]
                },
            },
        }
    )


def node_addresses(cluster: LocalCluster) -> list[str]:
    nodes = cluster.kubectl_json("get", "nodes")["items"]
    return [a["address"] for n in nodes for a in n.get("status", {}).get("addresses", []) if a.get("type") == "InternalIP"]


def apply(cluster: LocalCluster, objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        obj["metadata"].pop("ownerReferences", None)
    cluster.kubectl(
        "apply",
        "--server-side",
        "--field-manager=regmirror-operator",
        "-f",
        "-",
        input={"apiVersion": "v1", "kind": "List", "items": objects},
    )


def test_the_network_policy_and_the_external_service_are_admitted_as_rendered(cluster: LocalCluster, namespace: str) -> None:
    addresses = node_addresses(cluster)
    children = render_mirror_children(MIRROR, UID, spec(), namespace, node_addresses=addresses)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in children}
    policy = by_kind[("NetworkPolicy", f"regmirror-{MIRROR}")]
    apply(cluster, [policy, by_kind[("Service", external_service_name(MIRROR))]])

    stored = cluster.kubectl_json("get", "networkpolicy", f"regmirror-{MIRROR}", "-n", namespace)
    assert stored["spec"] == policy["spec"], "stored as rendered: no drift, no write on the next reconcile"
    rules = stored["spec"]["ingress"]
    node_rule = rules[0]
    assert addresses, "kwok nodes report InternalIP addresses"
    blocks = [ipaddress.ip_network(b["ipBlock"]["cidr"]) for b in node_rule["from"]]
    assert all(any(ipaddress.ip_address(a) in net for net in blocks) for a in addresses), "every node's address is admitted"
    assert all(net.prefixlen >= 24 or str(net) == "203.0.113.0/24" for net in blocks), "node addresses, collapsed, not a wide range"
    assert node_rule["ports"] == [{"protocol": "TCP", "port": c.REGISTRY_PORT}], "nodes reach the registry port only"
    assert {"podSelector": operator_pod_selector()} in rules[-2]["from"]
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in rules[-1]["from"]

    external = cluster.kubectl_json("get", "service", external_service_name(MIRROR), "-n", namespace)
    assert external["spec"]["type"] == "LoadBalancer"
    assert [p["name"] for p in external["spec"]["ports"]] == ["registry"], "only the registry port leaves the cluster"
    assert external["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    again = cluster.kubectl(
        "apply", "--server-side", "--field-manager=regmirror-operator", "--dry-run=server", "-o", "json", "-f", "-", input=policy
    )
    assert json.loads(again.stdout)["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"], "a second apply is a no-op"


def test_credentials_live_in_secrets_only_and_the_pods_that_mount_them_run(cluster: LocalCluster, namespace: str) -> None:
    s = spec()
    decision = acc.decide_access(acc.AccessInputs(MIRROR, s, now=1.0))
    values = [decision.state.current.password, decision.state.next.password, decision.client_data["ci"]["password"]]
    values += [decision.state.current.basic, decision.state.next.basic, decision.client_data["ci"]["auth"]]
    secrets = [
        render_auth_secret(MIRROR, UID, namespace, decision.auth_data),
        render_client_secret(MIRROR, UID, namespace, "ci", decision.client_data["ci"]),
        render_node_auth_secret({MIRROR: decision.node_entry}, namespace),
    ]
    plan = build_node_plan([mirror_entry(MIRROR, s, "10.96.0.40", auth_revision=decision.plan_revision)])
    children = [o for o in render_mirror_children(MIRROR, UID, s, namespace) if o["kind"] != "NetworkPolicy"]
    agent = [render_node_config_map(plan, namespace), render_agent_daemonset(plan, namespace, c.DEFAULT_OPERATOR_IMAGE)]
    cluster.kubectl("create", "secret", "generic", "quay-creds", "-n", namespace, "--from-literal=username=u", "--from-literal=password=p")
    apply(cluster, [*secrets, *children, *agent])

    def mirror_pod_running() -> bool:
        pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"{c.LABEL_MIRROR}={MIRROR}")["items"]
        return any(p.get("status", {}).get("phase") == "Running" for p in pods)

    cluster.wait_until(mirror_pod_running, timeout=120, what="the mirror pod (it mounts the access Secret) to run")
    stored = cluster.kubectl_json("get", "secret", acc.NODE_SECRET_NAME, "-n", namespace)
    assert set(stored["data"]) == {MIRROR}
    daemonset = cluster.kubectl_json("get", "daemonset", c.AGENT_NAME, "-n", namespace)
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["node-auth"]["secret"] == {"secretName": acc.NODE_SECRET_NAME, "defaultMode": 0o400, "optional": True}

    # Searched as the operator's secret-hygiene test searches: nowhere but in Secrets.
    everything = cluster.kubectl(
        "get", "configmaps,events,pods,deployments,daemonsets,services,networkpolicies", "-n", namespace, "-o", "yaml"
    ).stdout
    everything += cluster.kubectl("get", "registrymirrors", "-o", "yaml", check=False).stdout
    leaked = [v for v in values if v in everything]
    assert not leaked, "a credential outside a Secret"
    plan_text = cluster.kubectl_json("get", "configmap", c.NODE_CONFIG_NAME, "-n", namespace)["data"][c.NODE_CONFIG_KEY]
    assert json.loads(plan_text)["mirrors"][0]["authRevision"] == decision.plan_revision, "the plan names a revision, nothing more"
