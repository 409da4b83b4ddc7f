"""What a test makes, removed again in its teardown, even when the test failed.

``MirrorFactory`` (the ``mirrors`` fixture) applies RegistryMirrors and Secrets for one
test and remembers them; ``cleanup()`` deletes them and waits until they are gone, so
no mirror, finalizer or node rollout of one test is still at work in the next.

A mirror whose finalizer is not released in time (the operator is dead or broken) has
its finalizer removed so the next test starts clean, and ``cleanup()`` then fails,
naming it: a stuck deletion is a finding, not something to hide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from harness.cluster import LocalCluster
from harness.operator import OPERATOR_NS, apply, mirror_body
from harness.waiting import WaitTimeout, wait_for
from regmirror import constants as c

#: How long a teardown waits for a mirror's finalizer (every node drops its files first).
DELETE_TIMEOUT = 120.0


class CleanupError(AssertionError):
    """Teardown could not remove what the test made without forcing it."""


def present(cluster: LocalCluster, kind: str, names: list[str], namespace: str | None = None) -> list[str]:
    """Which of ``names`` exist (a deleting object with finalizers still exists): one LIST, not one GET each."""
    where = ["-n", namespace] if namespace else []
    listed = cluster.kubectl("get", kind, *where, "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    return [n for n in names if n in listed]


def delete_and_wait(cluster: LocalCluster, kind: str, names: list[str], namespace: str | None = None, *, timeout: float) -> list[str]:
    """Delete objects without blocking on each, then wait until all are gone; returns those still present."""
    if not names:
        return []
    where = ["-n", namespace] if namespace else []
    cluster.kubectl("delete", kind, *names, *where, "--wait=false", "--ignore-not-found", check=False)
    try:
        wait_for(lambda: not present(cluster, kind, names, namespace), timeout, f"{kind} {names} to be gone", interval=0.5)
    except WaitTimeout:
        return present(cluster, kind, names, namespace)
    return []


@dataclass
class MirrorFactory:
    """RegistryMirrors (and the Secrets they use) made by one test, deleted in its teardown."""

    cluster: LocalCluster
    mirrors: list[str] = field(default_factory=list)
    namespaced: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, namespace, name)

    def apply(self, body: dict[str, Any]) -> str:
        """Server-side apply a RegistryMirror as the admin would; returns its name."""
        name = str(body["metadata"]["name"])
        self.track_mirror(name)
        apply(self.cluster, body)
        return name

    def apply_all(self, bodies: list[dict[str, Any]]) -> list[str]:
        """Server-side apply many RegistryMirrors in one request (as one List); returns their names."""
        names = [str(b["metadata"]["name"]) for b in bodies]
        for name in names:
            self.track_mirror(name)
        apply(self.cluster, {"apiVersion": "v1", "kind": "List", "items": bodies})
        return names

    def create(self, name: str, **spec: Any) -> str:
        """Apply ``mirror_body(name, **spec)``; returns the name."""
        return self.apply(mirror_body(name, **spec))

    def track_mirror(self, name: str) -> None:
        """Delete this mirror in teardown too (one created another way, e.g. by kubectl create)."""
        if name not in self.mirrors:
            self.mirrors.append(name)

    def track(self, kind: str, name: str, namespace: str = OPERATOR_NS) -> None:
        """Delete this namespaced object in teardown (after the mirrors), e.g. a retained PVC."""
        if (kind, namespace, name) not in self.namespaced:
            self.namespaced.append((kind, namespace, name))

    def secret(self, name: str, namespace: str = OPERATOR_NS, **data: str) -> str:
        """Create (or replace) a generic Secret with string data; deleted in teardown."""
        self.track("secret", name, namespace)
        self.cluster.kubectl("delete", "secret", name, "-n", namespace, "--ignore-not-found")
        literals = [f"--from-literal={key}={value}" for key, value in data.items()]
        self.cluster.kubectl("create", "secret", "generic", name, "-n", namespace, *literals)
        return name

    def delete(self, name: str, timeout: float = DELETE_TIMEOUT) -> None:
        """Delete one mirror now and wait until it is gone (its finalizer released); fail if not."""
        left = delete_and_wait(self.cluster, c.SINGULAR, [name], timeout=timeout)
        assert not left, f"mirror {name} still present {timeout:g}s after its deletion:\n{self._describe(name)}"

    def cleanup(self, timeout: float = DELETE_TIMEOUT) -> None:
        """Delete everything this test made, mirrors first; force and fail if a finalizer is stuck."""
        stuck = delete_and_wait(self.cluster, c.SINGULAR, self.mirrors, timeout=timeout)
        described = {name: self._describe(name) for name in stuck}
        for name in stuck:
            # Let the next test start clean; the failure below still reports this one.
            self.cluster.kubectl(
                "patch", c.SINGULAR, name, "--type=merge", "-p", json.dumps({"metadata": {"finalizers": None}}), check=False
            )
        forced_left = delete_and_wait(self.cluster, c.SINGULAR, stuck, timeout=30) if stuck else []
        leftovers = []
        for kind in sorted({k for k, _, _ in self.namespaced}):
            for namespace in sorted({ns for k, ns, _ in self.namespaced if k == kind}):
                names = [n for k, ns, n in self.namespaced if k == kind and ns == namespace]
                leftovers += [f"{kind} {namespace}/{n}" for n in delete_and_wait(self.cluster, kind, names, namespace, timeout=60)]
        self.mirrors.clear()
        self.namespaced.clear()
        if stuck or leftovers:
            report = "\n".join(f"--- {name}:\n{text}" for name, text in described.items())
            raise CleanupError(
                f"teardown: mirrors {stuck} kept their finalizer for {timeout:g}s (removed by force"
                f"{'; still present: ' + str(forced_left) if forced_left else ''}); objects not deleted: {leftovers}\n{report}"
            )

    def _describe(self, name: str) -> str:
        result = self.cluster.kubectl("get", c.SINGULAR, name, "-o", "json", check=False)
        if result.returncode != 0:
            return "(gone)"
        body = json.loads(result.stdout)
        meta = body.get("metadata", {})
        summary = {"finalizers": meta.get("finalizers"), "deletionTimestamp": meta.get("deletionTimestamp"), "status": body.get("status")}
        return json.dumps(summary, indent=1)[:4000]
