"""musegen: a Compound Word Transformer pipeline for piano MIDI."""

__version__ = "0.1.0"
