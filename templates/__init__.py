"""Kernel sources and op definitions the passes emit (installed as ``popc.templates``)."""
