"""Image classification with the autoregressive trunk (the paper's Section 6).

A delvm checkpoint's transformer trunk, its token embedding replaced by a 16x16 patch embedding,
average-pooled and read by a linear head, fine-tuned with the MAE recipe on an image folder (one
sub-folder per class) or the built-in toy set (which kind of toy-world image).
"""
