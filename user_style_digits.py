"""user_style_digits.py moved to tools/user_style_digits.py; this line tells the old command where it went."""

raise SystemExit("user_style_digits.py is now tools/user_style_digits.py: run python -m tools.user_style_digits")
