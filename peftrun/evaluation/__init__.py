"""Evaluation (the loop training logs with), metrics, and `peftrun eval` / `peftrun predict` on a finished run."""
