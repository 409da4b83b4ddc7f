"""Benchmarks of regmirror against the targets in the architecture note.

``make bench`` (or ``PYTHONPATH=tests python -m bench [--scale large]``) runs, on
the local control plane of ``tests/harness`` and the real data path of
``tests/e2e``:

- control plane: N mirrors created at once on M kwok nodes, apply -> Ready per
  mirror, the same children applied directly (no operator) as the baseline, API
  requests per mirror from the audit log, writes in a quiet period, operator
  RSS and CPU, and a node rollout (one more mirror) against a bare DaemonSet;
  then, on the same cluster, the startup taint lifted from every node at once
  (``nodesafety.taint_on``);
- data path: cold / warm pulls through a mirror versus a direct pull, upstream
  blob fetches for K nodes, and the fail-open penalty with the mirror down; then
  the cache scenarios of issue 13 (``cache.py``);
- node safety (issue 14, ``nodesafety.py``): the fail-open per containerd
  release and failure mode, and the probe cost.

Each part has a ``--skip-...`` flag. It prints a table (figure, target, pass/miss,
"not measured" for a part that failed or could not run) and writes
``bench/results/<UTC timestamp>.json`` plus PNG plots.
"""
