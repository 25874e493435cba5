"""CPU-only speed-ups, applied once in setup by `tune_for_cpu` and never on a GPU."""
