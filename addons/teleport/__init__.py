"""Teleport: referrers discovery and the choice of the streamable manifest for a tag pull."""
