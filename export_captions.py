"""export_captions.py moved to tools/export_photos.py; this line tells the old command where it went."""

raise SystemExit("export_captions.py is now tools/export_photos.py: run python -m tools.export_photos")
