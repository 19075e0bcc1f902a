"""Layer 4: the HTTP app, its batcher, Ray Serve and Ray batch prediction."""
