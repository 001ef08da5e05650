"""Benchmark evaluation: runners that make what each benchmark scores, and the scorers."""
