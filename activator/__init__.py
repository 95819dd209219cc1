"""activator."""
