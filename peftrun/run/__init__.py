"""A run directory: its layout (run_dir.py), the files written into it (outputs.py) and the checks of a saved artefact (verify.py)."""
