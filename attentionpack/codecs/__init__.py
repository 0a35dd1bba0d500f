"""Compression codecs: each turns a block of K or V states into something smaller and back."""
