"""Training and evaluation loops, demos."""
