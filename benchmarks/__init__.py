"""Speed targets, measured against a baseline in the same run: ``python -m benchmarks`` (``make bench``)."""
