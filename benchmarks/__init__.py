"""fastswin benchmark suite. Entry point: ``python -m benchmarks.run --help``."""
