"""`peftrun train`: pre-flight checks, setup, the loop, resumable checkpoints and the verified final save."""
