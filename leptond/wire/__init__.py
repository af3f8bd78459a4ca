"""leptond/wire."""
