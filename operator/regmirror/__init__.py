"""regmirror: a Kubernetes operator for container-registry pull-through mirrors."""

__version__ = "0.1.0"
