"""benchmark_captions.py moved to tools/benchmark_photos.py; this line tells the old command where it went."""

raise SystemExit("benchmark_captions.py is now tools/benchmark_photos.py: run python -m tools.benchmark_photos")
