"""Simulations: running experiments on Flower's Ray simulation runtime, and their plots."""
