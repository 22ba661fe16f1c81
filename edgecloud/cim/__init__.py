"""Simulated compute-in-memory backends, event counting and energy accounting."""
