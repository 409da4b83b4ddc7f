"""Benchmarks of regmirror against the targets in the architecture note.

``make bench`` (or ``PYTHONPATH=tests python -m bench [--scale large]``) runs, on
the local control plane of ``tests/harness`` and the real data path of
``tests/e2e``:

- control plane: N mirrors created at once on M kwok nodes, apply -> Ready per
  mirror, the same children applied directly (no operator) as the baseline, API
  requests per mirror from the audit log, writes in a quiet period, operator
  RSS and CPU, and a node rollout (one more mirror) against a bare DaemonSet;
- data path: cold / warm pulls through a mirror versus a direct pull, upstream
  blob fetches for K nodes, and the fail-open penalty with the mirror down.

It prints a table (figure, target, pass/miss) and writes
``bench/results/<UTC timestamp>.json`` plus PNG plots.
"""
