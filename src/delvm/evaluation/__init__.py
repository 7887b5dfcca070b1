"""Measuring a model: next-token metrics per task, and task scores of generated images."""
