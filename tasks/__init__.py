"""The stages of a tunery pipeline as plain functions: each runs and is tested without Prefect."""
