"""Storage drivers shipped with cloudlets, one module per target."""
