"""The visual-sentence transformer, its checkpoints, and the Hugging Face format (import, export)."""
