"""flux."""
