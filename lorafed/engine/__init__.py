"""Engines: one round loop, and the transports that carry a round to clients (in-process, file drop, Flower)."""
