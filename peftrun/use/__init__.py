"""Using a trained model: batch generation and an interactive chat over any run, checkpoint or merge."""
