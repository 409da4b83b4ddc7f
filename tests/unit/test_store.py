"""The store's packed children: what goes in comes out, a status-only event is told apart, and it is small."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from regmirror import constants as c
from regmirror.controller.informer import Informer, Source
from regmirror.controller.store import VIEW_SPEC, PackedChild, Store, slim_child, slim_node
from regmirror.memory import deep_size
from regmirror.models import RegistryMirrorSpec
from regmirror.observe import cluster_ip
from regmirror.render.mirror import render_mirror_children

NS = "regmirror"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


def owned(name: str, mirror: str, **top: Any) -> dict[str, Any]:
    ref = {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": mirror, "uid": "u1"}
    meta = {"name": name, "namespace": NS, "resourceVersion": "7", "ownerReferences": [ref]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, **top}


def store_with(kind: str) -> tuple[Store, Informer]:
    """A store with one children informer (filled by the test, no API behind it)."""
    store = Store(NS, "agents")
    informer = Informer(None, Source(kind, NS, transform=slim_child), lambda *_: None)  # type: ignore[arg-type]
    store.add(informer)
    return store, informer


def rendered_deployment() -> dict[str, Any]:
    spec = RegistryMirrorSpec.model_validate({"upstream": {"url": "https://registry-1.docker.io"}})
    children = render_mirror_children("m1", "u1", spec, NS, credentials_hash="0" * 64, node_addresses=["10.0.0.1"])
    return next(o for o in children if o["kind"] == "Deployment")


@given(spec=json_values, status=st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=4), extra=json_values)
def test_a_packed_child_unpacks_to_the_object_without_managed_fields(spec: Any, status: Any, extra: Any) -> None:
    obj = owned("regmirror-m1", "m1", spec=spec, data=extra)
    if status is not None:
        obj["status"] = status
    live = copy.deepcopy(obj)
    live["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    packed = slim_child(live)
    assert isinstance(packed, PackedChild)
    assert packed.mirror == "m1"
    assert packed.unpack() == obj


@given(
    kind=st.sampled_from(["Deployment", "Service", "PersistentVolumeClaim"]),
    spec=st.dictionaries(st.sampled_from(["clusterIP", "replicas", "type", "ports"]), json_values, max_size=4) | json_values,
    status=st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=4),
)
def test_a_childs_view_is_the_unpacked_object_less_the_spec_fields_no_pass_reads(kind: str, spec: Any, status: Any) -> None:
    """The status and node plan passes read `view()` (nothing decoded): it must agree with the whole object
    on metadata, status and the spec fields those passes read (a Service's clusterIP)."""
    obj = owned("regmirror-m1", "m1", spec=spec) | {"kind": kind}
    if status is not None:
        obj["status"] = status
    packed = slim_child(obj)
    assert packed is not None
    view, whole = packed.view(), packed.unpack()
    assert view["metadata"] == whole["metadata"]
    assert view.get("status") == whole.get("status")
    whole_spec = whole["spec"] if isinstance(whole["spec"], dict) else {}
    assert view["spec"] == {k: whole_spec[k] for k in VIEW_SPEC.get(kind, ()) if k in whole_spec}


def test_a_services_cluster_ip_is_read_from_its_view() -> None:
    store, informer = store_with("Service")
    informer._put(owned("regmirror-m1", "m1", spec={"clusterIP": "10.96.0.7", "ports": [{"port": 5000}]}) | {"kind": "Service"})
    assert cluster_ip(store.child_view("Service", "m1")) == "10.96.0.7"
    assert store.child_view("Service", "m2") is None


def test_a_child_of_no_mirror_is_not_kept() -> None:
    stranger = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes", "namespace": NS}, "spec": {}}
    assert slim_child(stranger) is None


def test_a_status_only_change_is_told_apart_from_a_spec_or_metadata_change() -> None:
    base = owned("regmirror-m1", "m1", spec={"replicas": 1}, status={"readyReplicas": 0})
    packed = slim_child(base)
    assert packed is not None
    status_only = copy.deepcopy(base)
    status_only["status"]["readyReplicas"] = 1
    status_only["metadata"]["resourceVersion"] = "8"
    assert slim_child(status_only) != packed  # the store takes it (the status pass reads it) ...
    assert packed.same_but_status(slim_child(status_only))  # ... but it needs no children pass
    scaled = copy.deepcopy(base)
    scaled["spec"]["replicas"] = 0
    relabelled = copy.deepcopy(base)
    relabelled["metadata"]["labels"] = {"app": "other"}
    for changed in (scaled, relabelled):
        assert not packed.same_but_status(slim_child(changed))
    assert not packed.same_but_status(None)


def test_an_unpacked_child_is_a_new_dict_each_time() -> None:
    packed = slim_child(owned("regmirror-m1", "m1", spec={"replicas": 1}))
    assert packed is not None
    first = packed.unpack()
    first["spec"]["replicas"] = 5
    assert packed.unpack()["spec"]["replicas"] == 1


def test_a_packed_deployment_is_a_fraction_of_the_decoded_one() -> None:
    deployment = rendered_deployment()
    deployment["metadata"]["ownerReferences"] = [{"apiVersion": c.API_VERSION, "kind": c.KIND, "name": "m1", "uid": "u1"}]
    packed = slim_child(deployment)
    assert packed is not None
    # deep_size follows __slots__: the packed child is measured with its JSON, not as an empty shell.
    assert deep_size(packed) > len(packed.rest) > len(json.dumps(deployment["spec"])) // 2
    assert deep_size(packed) < deep_size(deployment) / 2


@given(
    versions=st.integers(min_value=2, max_value=8),
    responses=st.lists(st.tuples(st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=8)), max_size=6),
)
def test_a_late_write_response_never_hides_what_the_watch_reported_since(versions: int, responses: list[tuple[int, int]]) -> None:
    """Versions 1..n of a Deployment (the last one Ready) reach the store through the watch, in order; write
    responses for some of them arrive late, each at any point after its own version exists. The store ends
    with the newest version (the readiness the status reads), whatever the interleaving.

    Before responses were compared by resourceVersion, a response overtaken by the watch put the stale
    copy back for good: a mirror stayed "0/1 registry pods ready" though its pod was Ready (CI run G)."""

    store, informer = store_with("Deployment")

    def version(n: int) -> dict[str, Any]:
        obj = owned("regmirror-m1", "m1", spec={"replicas": 1}, status={"readyReplicas": 1 if n == versions else 0})
        obj["metadata"]["resourceVersion"] = str(100 + n)
        return obj

    late: dict[int, list[int]] = {}
    for of, after in responses:
        of = min(of, versions)
        late.setdefault(max(of, min(after, versions)), []).append(of)
    for n in range(1, versions + 1):
        informer._put(version(n))
        for of in late.get(n, []):
            store.put_child(version(of))
    child = store.child("Deployment", "m1")
    assert child is not None
    assert child["metadata"]["resourceVersion"] == str(100 + versions)
    assert child["status"] == {"readyReplicas": 1}


def test_a_write_response_replaces_an_older_copy_and_an_unnumbered_one() -> None:
    """The response of our own write is newer than what the watch reported so far: it is kept at once."""

    store, informer = store_with("Deployment")
    old = owned("regmirror-m1", "m1", spec={"replicas": 1})
    informer._put(old)
    new = owned("regmirror-m1", "m1", spec={"replicas": 2})
    new["metadata"]["resourceVersion"] = "8"
    seen = informer.changes
    store.put_child(new)
    assert store.child("Deployment", "m1")["spec"] == {"replicas": 2}  # type: ignore[index]
    assert informer.changes == seen + 1, "what is derived from the store sees the write's result"
    store.put_child(new)
    assert informer.changes == seen + 1, "the same response again changes nothing"
    odd = owned("regmirror-m1", "m1", spec={"replicas": 3})
    odd["metadata"]["resourceVersion"] = "not-a-number"
    store.put_child(odd)
    assert store.child("Deployment", "m1")["spec"] == {"replicas": 3}  # type: ignore[index]


def test_node_addresses_follow_every_node_change_and_are_not_gathered_again_otherwise() -> None:
    """Every children pass reads the nodes' addresses (its NetworkPolicy); they are gathered again only after a
    Node changed in what the store keeps, so a heartbeat costs nothing and an address change is never missed."""
    store = Store(NS, "agents")
    informer = Informer(None, Source("Node", transform=slim_node), lambda *_: None)  # type: ignore[arg-type]
    store.add(informer)

    def node(name: str, address: str, heartbeat: str = "t0") -> dict[str, Any]:
        conditions = [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}]
        status = {"addresses": [{"type": "InternalIP", "address": address}], "conditions": conditions}
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": status}

    assert store.node_addresses() == ()
    informer._put(node("n1", "10.0.0.2"))
    informer._put(node("n2", "10.0.0.1"))
    first = store.node_addresses()
    assert first == ("10.0.0.1", "10.0.0.2")
    informer._put(node("n1", "10.0.0.2", heartbeat="t1"))
    assert store.node_addresses() is first, "a heartbeat changes nothing the store keeps"
    informer._put(node("n1", "10.0.0.3"))
    assert store.node_addresses() == ("10.0.0.1", "10.0.0.3")
    informer._delete("n2")
    assert store.node_addresses() == ("10.0.0.3",)
