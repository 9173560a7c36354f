"""lifec-registry: a client-side registry mirror for containerd, built as mitmproxy addons."""

__version__ = "0.1.0"
