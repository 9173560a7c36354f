"""Test harness: real registries, a token server, containerd and image builders, all on loopback.

Everything here starts real processes or servers bound to 127.0.0.1 on free ports and stops them
on ``stop()``/context exit, so end-to-end tests exercise the real protocols without leaving the
machine.
"""
