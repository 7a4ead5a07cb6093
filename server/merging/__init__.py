"""Merged models: an adapter version folded into its base, for an engine that serves no LoRA."""
