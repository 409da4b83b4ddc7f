"""A list+watch of one API collection in a thread, stamping every event with its arrival time.

The benchmark needs *when* things happened (a mirror turned Ready, a Deployment
became Available, an agent pod became Ready), not just that they did; polling
with kubectl would cost a process per look and blur the times. One kept-open
watch per collection costs the API server what any controller costs it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import yaml

from harness import LocalCluster

Handler = Callable[[str, dict[str, Any], float], None]


def admin_token(cluster: LocalCluster) -> str:
    """The admin bearer token, read from the cluster's admin kubeconfig."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    return str(config["users"][0]["user"]["token"])


class Watch(threading.Thread):
    """List ``path`` (as ADDED events), then watch it from that resourceVersion until ``stop()``.

    ``handler(type, object, monotonic_time)`` runs in this thread; a dropped or
    expired watch is re-listed (objects then arrive again as ADDED).
    """

    def __init__(self, cluster: LocalCluster, path: str, handler: Handler, *, label_selector: str | None = None) -> None:
        super().__init__(name=f"watch {path}", daemon=True)
        self.cluster = cluster
        self.path = path
        self.handler = handler
        self.label_selector = label_selector
        self.token = admin_token(cluster)
        self.ssl = ssl.create_default_context(cafile=str(cluster.ca_cert))
        self._halt = threading.Event()
        self.synced = threading.Event()
        self.events = 0
        self._conn: http.client.HTTPSConnection | None = None

    def _query(self, **params: str) -> str:
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return self.path + "?" + urllib.parse.urlencode(params)

    def _request(self, query: str, timeout: float) -> http.client.HTTPResponse:
        conn = http.client.HTTPSConnection("127.0.0.1", self.cluster.port, context=self.ssl, timeout=timeout)
        self._conn = conn
        conn.request("GET", query, headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json"})
        response = conn.getresponse()
        if response.status >= 400:
            raise RuntimeError(f"GET {query}: HTTP {response.status}: {response.read()[:500]!r}")
        return response

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                listed = json.loads(self._request(self._query(), 60).read())
                now = time.monotonic()
                for item in listed.get("items") or []:
                    self.handler("ADDED", item, now)
                self.synced.set()
                rv = listed["metadata"]["resourceVersion"]
                stream = self._request(self._query(watch="1", resourceVersion=rv, allowWatchBookmarks="true", timeoutSeconds="600"), 660)
                for line in stream:
                    if self._halt.is_set():
                        return
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        break  # 410 Gone: list again
                    if event["type"] == "BOOKMARK":
                        continue
                    self.events += 1
                    self.handler(event["type"], event["object"], time.monotonic())
            except (OSError, http.client.HTTPException, ValueError, RuntimeError):
                if self._halt.is_set():
                    return
                time.sleep(0.5)
            finally:
                if self._conn is not None:
                    self._conn.close()

    def stop(self) -> None:
        self._halt.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(2)
