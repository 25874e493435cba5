"""Processes: the accelerate/DeepSpeed backend (accelerator.py), Slurm jobs (slurm.py) and the scheduler signals that stop a run (signals.py)."""
