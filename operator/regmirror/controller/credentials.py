"""The upstream credentials check, off the reconcile path.

distribution in proxy mode never says that the upstream rejected its
credentials, so the operator does the registry login handshake itself
(upstream.py) and reports the verdict as the UpstreamAuthenticated condition.
The handshake can take seconds, so it never runs inside a reconcile: the
children reconciler announces a mirror's credentials fingerprint, one task per
mirror performs the check in a thread, caches the verdict by fingerprint,
and queues the mirror's status when the verdict changes. An inconclusive or
failed verdict is checked again after `upstream_recheck`; a good one only
when the credentials change. The children are applied whatever the verdict.

When the API server does not hand out the Secrets, nothing is checked. A
refusal someone must fix (403) is reported at once (UpstreamAuthenticated
Unknown, CheckFailed, naming the Secret); a failure that may pass (409, 429,
5xx, timeouts) is retried with backoff, and reported only when it lasted the
`transient_grace` and no verdict for these credentials stands: an API hiccup
never turns a known verdict into Unknown.
"""

from __future__ import annotations

import asyncio
import base64
import logging

from regmirror.controller.state import STATUS, Context
from regmirror.kube import ApiError, cancel_quietly
from regmirror.models import RegistryMirrorSpec
from regmirror.upstream import Proxies, UpstreamCheck, check_upstream

log = logging.getLogger("regmirror.credentials")


class SecretUnreadable(Exception):
    """The API server did not hand out a Secret the check reads."""

    def __init__(self, namespace: str, name: str, error: ApiError) -> None:
        super().__init__(f"{namespace}/{name}: {error}")
        self.namespace, self.name, self.error = namespace, name, error

    def verdict(self) -> UpstreamCheck:
        """What UpstreamAuthenticated says (the API server's words name no Secret value)."""
        message = f"the credentials check could not read Secret {self.namespace}/{self.name}: {self.error}"
        if self.error.status == 403:
            message += "; someone must let the operator's ServiceAccount get Secrets in its namespace (RBAC)"
        return UpstreamCheck(None, "CheckFailed", message)


class UpstreamChecker:
    """One background check per mirror with credentials; verdicts land in `ctx.upstream_verdicts`."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}

    def credentials_changed(self, name: str, spec: RegistryMirrorSpec, fingerprint: str | None) -> None:
        """Start (or restart) the check of a mirror when what it checks changed: the Secrets' values, the URL or the proxy.

        Called on every pass over a mirror's spec; a check already running or
        done for the same inputs is kept.
        """
        key = None
        if spec.upstream.credentials_secret_ref is not None and fingerprint is not None:
            proxy = spec.proxy
            key = f"{fingerprint}|{spec.upstream.url}|{proxy.http_proxy}|{proxy.https_proxy}|{proxy.no_proxy}"
        current = self._tasks.get(name)
        if current is not None and current[0] == key:
            return
        if current is not None:
            self._tasks.pop(name)[1].cancel()
        if key is None:
            if self.ctx.upstream_verdicts.pop(name, None) is not None:
                self.ctx.enqueue(STATUS, name)
            return
        self._tasks[name] = (key, asyncio.get_running_loop().create_task(self._run(name, spec), name=f"upstream check {name}"))

    def forget(self, name: str) -> None:
        """The mirror is gone."""
        current = self._tasks.pop(name, None)
        if current is not None:
            current[1].cancel()
        self.ctx.upstream_verdicts.pop(name, None)

    async def stop(self) -> None:
        """Cancel every check."""
        for _, task in self._tasks.values():
            await cancel_quietly(task)
        self._tasks.clear()

    async def _verdict(self, spec: RegistryMirrorSpec) -> UpstreamCheck:
        ref = spec.upstream.credentials_secret_ref
        assert ref is not None
        ca_ref = spec.upstream.tls.ca_secret_ref if spec.upstream.tls else None
        # The values are read for this check only (the store keeps hashes), each Secret once.
        secrets: dict[str, dict[str, str]] = {}
        namespace = self.ctx.settings.namespace
        for name in sorted({ref.name, *([ca_ref.name] if ca_ref is not None else [])}):
            try:
                secrets[name] = (await self.ctx.client.get("Secret", namespace, name) or {}).get("data") or {}
            except ApiError as exc:
                raise SecretUnreadable(namespace, name, exc) from None

        def value(name: str, key: str) -> str:
            encoded = secrets.get(name, {}).get(key, "")
            return base64.b64decode(encoded).decode(errors="replace") if encoded else ""

        ca_pem = (value(ca_ref.name, ca_ref.key) or None) if ca_ref is not None else None
        username, password = value(ref.name, ref.username_key), value(ref.name, ref.password_key)
        proxies = Proxies(spec.proxy.http_proxy, spec.proxy.https_proxy, spec.proxy.no_proxy)
        return await asyncio.to_thread(check_upstream, spec.upstream.url, username, password, ca_pem=ca_pem, proxies=proxies)

    async def _run(self, name: str, spec: RegistryMirrorSpec) -> None:
        settings = self.ctx.settings
        decided = False  # whether this task (these credentials) published a verdict
        failing_since: float | None = None
        pause = settings.backoff_base
        while True:
            try:
                verdict = await self._verdict(spec)
                failing_since, pause = None, settings.backoff_base
            except asyncio.CancelledError:
                raise
            except SecretUnreadable as exc:
                if exc.error.transient:
                    now = self.ctx.clock()
                    failing_since = now if failing_since is None else failing_since
                    if decided or now - failing_since < settings.transient_grace:
                        # Retried quietly: the verdict that stands (if any) is still the best one there is.
                        log.info("upstream check of %s: %s; retrying in %.1fs", name, exc, pause)
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, settings.upstream_recheck)
                        continue
                log.warning("upstream check of %s: %s", name, exc)
                verdict = exc.verdict()
            except Exception as exc:  # the check only ever yields a verdict
                verdict = UpstreamCheck(None, "CheckFailed", f"the credentials check could not run: {type(exc).__name__}")
                log.warning("upstream check of %s failed: %s", name, type(exc).__name__)
            decided = True
            result = (verdict.ok, verdict.reason, verdict.message)
            if self.ctx.upstream_verdicts.get(name) != result:
                self.ctx.upstream_verdicts[name] = result
                self.ctx.enqueue(STATUS, name)
            if verdict.ok:
                return
            await asyncio.sleep(self.ctx.settings.upstream_recheck)
