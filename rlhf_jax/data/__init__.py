"""Tokenizers, bundled tasks and fixed-shape batching."""
