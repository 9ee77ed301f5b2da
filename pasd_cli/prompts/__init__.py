"""Where each image's description comes from (`sources.py`: sidecars, the prompt file, the
captioner, nothing) and the caption cache (`cache.py`)."""
