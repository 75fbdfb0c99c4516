"""Training loops, checkpoints and demos built on detectron2's engine."""
