"""The activator: HTTP entry, holds requests through cold starts, routes, streams (see app.py)."""
