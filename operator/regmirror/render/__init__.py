"""Pure renderers: a spec or a node plan in, plain Kubernetes objects or file texts out.

No kopf, no kubernetes client, no I/O: reconcile applies what these return.
Import the submodules (`mirror`, `agent`, `nodefiles`) directly: this package
deliberately imports nothing, so the node agent loads `nodefiles` without the
pydantic models the other two need (the agent's memory budget is per node).
"""
