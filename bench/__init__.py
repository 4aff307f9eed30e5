"""Benchmark tooling: comparison servers, a stdlib load generator, and the runner (`python3 -m bench.run`)."""
