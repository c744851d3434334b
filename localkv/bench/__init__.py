"""Benchmarks (`localkv bench ...`): each measured configuration runs in its own process so peak RSS is its own."""
