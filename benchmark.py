"""benchmark.py moved to tools/benchmark.py; this line tells the old command where it went."""

raise SystemExit("benchmark.py is now tools/benchmark.py: run python -m tools.benchmark")
