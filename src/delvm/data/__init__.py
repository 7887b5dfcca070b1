"""Data: sources in real annotation formats, target rendering, paired augmentation, toy world."""
