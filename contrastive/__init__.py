"""contrastive: CLIP-style contrastive image-text pretraining."""

__version__ = "0.1.0"
