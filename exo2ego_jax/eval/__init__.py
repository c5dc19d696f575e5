"""Zero-shot evaluation: the eight egocentric benchmarks (loaders in their official formats, metrics) and the
resumable runner behind `launch/evaluate.py`."""
