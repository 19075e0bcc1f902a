"""Layer 0: errors, image I/O and the one preprocessing path. Imports nothing else from imgclf."""
