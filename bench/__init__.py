"""Benchmarks: each runs our code and its peers side by side and writes JSON plus a PNG."""
