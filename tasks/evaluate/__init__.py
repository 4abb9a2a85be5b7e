"""Measuring a version: perplexity, answers and latency, answer scores, the general suite, the judge."""
