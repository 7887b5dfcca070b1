"""delvm: data-efficient autoregressive Large Vision Models (DeLVM / LVM) in PyTorch."""

__version__ = "0.1.0"
