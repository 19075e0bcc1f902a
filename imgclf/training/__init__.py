"""Layer 3: the typed config, recipes, the Trainer and its callbacks, transfer, Ray training."""
