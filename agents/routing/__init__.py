"""Routing policies: classic, cache-aware and predictive (see each module)."""
