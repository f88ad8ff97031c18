"""Bundled demo data (a CT slice and its liver mask, with attribution)."""
