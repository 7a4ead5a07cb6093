"""Tenant limits: rates, token budgets and concurrency, on Redis (shared) or in memory (one box)."""
