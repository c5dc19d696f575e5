"""Benchmark helpers: timing of jitted steps, FLOP accounting, peak memory, table printing."""
