"""Layer 1: data sources, splits, the decode cache, duplicate grouping and augmentation."""
