"""The `+ .proxy` request path: the front door, routes, login, authn, resolve, pull, and the per-request context."""
