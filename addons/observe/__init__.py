"""What observes the mirror: /metrics, /auth and /status, flow recording with the credential scrubber, offline replay."""
