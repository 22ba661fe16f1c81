"""edgecloud: a distributed edge-cloud inference runtime with simulated compute-in-memory edges."""

__version__ = "0.1.0"
