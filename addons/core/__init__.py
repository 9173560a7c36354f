"""Lowest layer: small helpers every layer shares, and the one module that leans on mitmproxy internals."""
