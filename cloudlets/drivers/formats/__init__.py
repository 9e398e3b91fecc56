"""Format drivers shipped with cloudlets, one module per format."""
