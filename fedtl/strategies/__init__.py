"""Strategies: Flower's own, selected by name, wrapped with what fine-tuning needs."""
