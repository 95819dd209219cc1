"""loader_sidecar."""
