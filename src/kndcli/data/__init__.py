"""Prepared sets: manifest, speaker-independent splits, waveform store, reference features."""
