"""Kiosks for testing the kit: :mod:`.kiosk`, a minimal one with optional flaws."""
