"""leptond."""
