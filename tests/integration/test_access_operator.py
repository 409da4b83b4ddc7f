"""Who may pull, driven by the real operator on a real control plane (kwok nodes and agent pods).

A Restricted mirror with an access client: the operator creates its access
Secret, the client's Secret and the nodes' copy, names the credential's
revision in the node plan, enforces once the agents applied it, and reports
it in status.access. Hands then break what it made (a deleted Secret, a
corrupted one, the nodes' copy gone) and a rotation is asked for: each time
the operator converges again, and no credential ever shows outside the
Secrets (ConfigMaps, Events, status, its own log), searched as the operator's
secret-hygiene test searches.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from harness import LocalCluster
from harness.objects import MirrorFactory
from harness.operator import AGENT_NS, OPERATOR_NS, OperatorProcess, get_mirror, mirror_body
from regmirror import access as acc
from regmirror import constants as c

NAME = "acc-op"


def secret_data(cluster: LocalCluster, name: str, namespace: str = OPERATOR_NS) -> dict[str, str]:
    result = cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return {}
    return {k: base64.b64decode(v).decode() for k, v in (json.loads(result.stdout).get("data") or {}).items()}


def access_status(cluster: LocalCluster) -> dict[str, Any]:
    return dict((get_mirror(cluster, NAME).get("status") or {}).get("access") or {})


def plan_revision(cluster: LocalCluster) -> int | None:
    cm = cluster.kubectl_json("get", "configmap", c.NODE_CONFIG_NAME, "-n", AGENT_NS)
    entries = json.loads(cm["data"][c.NODE_CONFIG_KEY])["mirrors"]
    return next((e.get("authRevision") for e in entries if e["name"] == NAME), None)


def state(cluster: LocalCluster) -> acc.AccessState:
    return acc.parse_state(secret_data(cluster, acc.auth_secret_name(NAME)).get(acc.STATE_KEY))


def no_credential_outside_secrets(cluster: LocalCluster, operator: OperatorProcess, values: list[str]) -> None:
    everything = cluster.kubectl("get", "configmaps,events,networkpolicies,deployments,daemonsets", "-A", "-o", "yaml").stdout
    everything += cluster.kubectl("get", "registrymirrors", "-o", "yaml").stdout + operator.logs()
    assert not [v for v in values if v and v in everything], "a credential outside a Secret"


def test_the_operator_issues_enforces_restores_and_rotates_access(
    cluster: LocalCluster, operator: OperatorProcess, mirrors: MirrorFactory
) -> None:
    mirrors.secret("acc-op-upstream", username="puller", password="upstream-Pa55")
    mirrors.apply(
        mirror_body(
            NAME,
            upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": "acc-op-upstream"}},
            access={"clients": [{"name": "ci"}]},
        )
    )
    enforced = cluster.wait_until(lambda: (s := access_status(cluster)).get("enforced") and s, timeout=120, what="status.access enforced")
    assert enforced["policy"] == "Restricted" and enforced["clients"] == [acc.client_secret_name(NAME, "ci")]
    assert enforced["networkPolicy"] is True
    first = state(cluster)
    assert first.revision == enforced["revision"]
    cluster.wait_until(lambda: plan_revision(cluster) == first.revision, timeout=60, what="the node plan to name the revision")
    nodes_copy = secret_data(cluster, acc.NODE_SECRET_NAME, AGENT_NS)[NAME]
    assert acc.parse_node_entry(nodes_copy)[1][first.revision] == first.current
    client = secret_data(cluster, acc.client_secret_name(NAME, "ci"))
    assert set(client) == {"username", "password", "auth"}
    cluster.kubectl("get", "networkpolicy", f"regmirror-{NAME}", "-n", OPERATOR_NS)
    values = [first.current.password, first.next.password, first.current.basic, client["password"], client["auth"]]
    no_credential_outside_secrets(cluster, operator, values)

    # A hand deletes the access Secret: restored from the nodes' copy, same credential (no node must change).
    cluster.kubectl("delete", "secret", acc.auth_secret_name(NAME), "-n", OPERATOR_NS)
    restored = cluster.wait_until(
        lambda: secret_data(cluster, acc.auth_secret_name(NAME)).get(acc.STATE_KEY) and state(cluster),
        timeout=60,
        what="the access Secret to be restored",
    )
    assert restored.current == first.current and restored.revision == first.revision

    # A hand corrupts the client's Secret: reissued, the old value no longer accepted.
    cluster.kubectl("patch", "secret", acc.client_secret_name(NAME, "ci"), "-n", OPERATOR_NS, "-p", '{"stringData": {"auth": "tampered"}}')
    reissued = cluster.wait_until(
        lambda: (d := secret_data(cluster, acc.client_secret_name(NAME, "ci"))).get("auth") not in ("tampered", client["auth"]) and d,
        timeout=60,
        what="the client's credential to be reissued",
    )
    assert reissued["password"] != client["password"]
    accepted = secret_data(cluster, acc.auth_secret_name(NAME))[acc.ACCESS_VCL_KEY]
    assert f"Basic {reissued['auth']}" in accepted and f"Basic {client['auth']}" not in accepted

    # A hand deletes the nodes' copy: put back as it was.
    cluster.kubectl("delete", "secret", acc.NODE_SECRET_NAME, "-n", AGENT_NS)
    cluster.wait_until(
        lambda: secret_data(cluster, acc.NODE_SECRET_NAME, AGENT_NS).get(NAME) == nodes_copy, timeout=60, what="the nodes' copy back"
    )

    # A rotation: the plan names revision 2, the old credential stays accepted until every agent applied it.
    cluster.kubectl("annotate", "registrymirror", NAME, f"{acc.ANNOTATION_ROTATE}=now", "--overwrite")
    cluster.wait_until(lambda: plan_revision(cluster) == first.revision + 1, timeout=90, what="the plan to name the next revision")
    done = cluster.wait_until(
        lambda: (s := state(cluster)).retired is None and s.revision == first.revision + 1 and s,
        timeout=120,
        what="every node to have the new credential and the old one to be dropped",
    )
    assert done.current == first.next, "the credential handed out is the one every front accepted a rotation ago"
    assert first.current.authorization not in secret_data(cluster, acc.auth_secret_name(NAME))[acc.ACCESS_VCL_KEY]
    events = cluster.kubectl("get", "events", "-A", "--field-selector", f"involvedObject.name={NAME}", "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert {"CredentialsRecovered", "ClientCredentialIssued", "CredentialsRotated"} <= reasons, reasons
    final = secret_data(cluster, acc.client_secret_name(NAME, "ci"))
    no_credential_outside_secrets(cluster, operator, [*values, done.current.password, done.next.password, final["password"], final["auth"]])
