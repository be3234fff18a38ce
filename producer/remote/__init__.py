"""Handles on devices, one way: fleet → device → pointers → ops, and the reply collector."""
