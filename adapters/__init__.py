"""Tenant adapters: validation, storage and registry (filled in by the adapters issue)."""
