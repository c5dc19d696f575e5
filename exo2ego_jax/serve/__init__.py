"""Serving a trained checkpoint: KV-cache generation, `load_model` / `answer_question`, option scoring."""
