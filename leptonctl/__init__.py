"""leptonctl."""
