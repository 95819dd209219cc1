"""sllm_knative."""
