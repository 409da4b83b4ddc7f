"""Moved to ``harness.dataplane.images``; this name stays for bench/dataplane.py, which still imports it."""

from harness.dataplane.images import BuiltImage, Descriptor, multi_layer_image, multi_platform_index

__all__ = ["BuiltImage", "Descriptor", "multi_layer_image", "multi_platform_index"]
