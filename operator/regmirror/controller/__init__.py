"""The controller core: informers fill a store, events queue keys, workers run one reconciler per concern.

See docs/architecture.md for the shape and the reasons.
"""
