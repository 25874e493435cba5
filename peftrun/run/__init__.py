"""A run directory: its layout (run_dir.py), the files written into it (outputs.py), atomic writes (staging.py) and the checks of a saved artefact (verify.py)."""
