"""Offline half: learn identity embeddings with softmax (or a margin head) + center loss, evaluate, export."""
