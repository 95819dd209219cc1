"""Subcommands of the sllm-knative CLI, one module each (see sllm_knative/cli.py)."""
