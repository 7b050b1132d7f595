"""vfmbench: a plugin-based benchmark suite for visual tokenizers of latent diffusion models."""
__version__ = "0.1.0"
