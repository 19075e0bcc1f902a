"""Layer 3: evaluation, the report, plots, Grad-CAM and the dataset doctor."""
