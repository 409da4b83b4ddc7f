"""The access reconciler against the fake client: Secrets issued once, restored, never dropped by a restart, no idle writes."""

from __future__ import annotations

import base64
import json

from controller_kit import AGENT_NS, NS, Kit, mirror

from regmirror import access as acc
from regmirror import constants as c
from regmirror.nodeplan import NodePlan

PRIVATE = {"upstream": {"url": "https://quay.io", "credentialsSecretRef": {"name": "quay"}}, "access": {"clients": [{"name": "ci"}]}}


def data(kit: Kit, name: str, namespace: str = NS) -> dict[str, str]:
    obj = kit.kube.obj("Secret", namespace, name) or {}
    return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}


def quay_secret(kit: Kit) -> None:
    values = {"username": "u", "password": "p"}
    kit.kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "quay", "namespace": NS},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
        }
    )


async def test_a_new_private_mirror_gets_its_secrets_and_one_plan_naming_the_revision() -> None:
    kit = Kit()
    quay_secret(kit)
    kit.kube.put(mirror("q", **PRIVATE))
    await kit.converge("q")
    state = acc.parse_state(data(kit, acc.auth_secret_name("q"))[acc.STATE_KEY])
    assert state.enforced, "nodes get the route and the credential in one plan: enforced from the start"
    assert set(data(kit, acc.client_secret_name("q", "ci"))) == {"username", "password", "auth"}
    cm = kit.kube.obj("ConfigMap", AGENT_NS, c.NODE_CONFIG_NAME)
    assert cm is not None
    assert [e.auth_revision for e in NodePlan.from_json(cm["data"][c.NODE_CONFIG_KEY]).mirrors] == [state.revision]
    entry = data(kit, acc.NODE_SECRET_NAME, AGENT_NS)["q"]
    assert acc.parse_node_entry(entry)[1][state.revision] == state.current
    # The plan (with the credential's revision) is applied after the Secret the agents read it from.
    writes = [w[1] for w in kit.kube.writes() if w[1] in ("Secret", "ConfigMap") and w[2] in (acc.NODE_SECRET_NAME, c.NODE_CONFIG_NAME)]
    assert writes.index("Secret") < writes.index("ConfigMap")


async def test_a_quiet_mirror_costs_no_write_and_a_restart_drops_no_credential() -> None:
    kit = Kit()
    quay_secret(kit)
    kit.kube.put(mirror("q", **PRIVATE))
    await kit.converge("q")
    kit.kube.calls.clear()
    kit.clock.advance(5)
    await kit.run("access", "q")
    await kit.run("plan")
    assert kit.kube.writes() == [], "nothing changed: nothing written (no new bcrypt salt, no new generation)"
    before = data(kit, acc.NODE_SECRET_NAME, AGENT_NS)
    again = Kit(kit.kube)
    await again.run("plan")  # a restarted operator's plan pass runs before any access pass
    assert data(again, acc.NODE_SECRET_NAME, AGENT_NS) == before


async def test_a_deleted_access_secret_comes_back_with_the_same_credential() -> None:
    kit = Kit()
    quay_secret(kit)
    kit.kube.put(mirror("q", **PRIVATE))
    await kit.converge("q")
    before = acc.parse_state(data(kit, acc.auth_secret_name("q"))[acc.STATE_KEY])
    kit.kube.events.clear()
    kit.kube.remove("Secret", NS, acc.auth_secret_name("q"))
    await kit.run("access", "q")
    after = acc.parse_state(data(kit, acc.auth_secret_name("q"))[acc.STATE_KEY])
    assert after.current == before.current and after.revision == before.revision
    assert [e["reason"] for e in kit.kube.events if e["name"] == "q"] == ["CredentialsRecovered"]


async def test_status_access_says_the_policy_and_names_the_client_secrets_only() -> None:
    kit = Kit()
    quay_secret(kit)
    kit.kube.put(mirror("q", **PRIVATE))
    await kit.converge("q")
    kit.clock.advance(61)  # a new mirror's first status waits while it is merely progressing
    await kit.run("status", "q")
    body = kit.kube.obj(c.KIND, None, "q")
    assert body is not None
    status = body["status"]["access"]
    assert status["policy"] == "Restricted" and status["clients"] == [acc.client_secret_name("q", "ci")]
    secrets = data(kit, acc.client_secret_name("q", "ci"))
    assert secrets["password"] not in json.dumps(body)
