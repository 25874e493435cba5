"""The base model: loading it (load.py), the training methods that wrap it (methods.py), what differs per task (tasks.py)."""
