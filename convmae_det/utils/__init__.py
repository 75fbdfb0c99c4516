"""Small helpers with no model code, the lowest layer of the package (see ``.importlinter``):
the precision table, seeding, the sliding-window grid and position-table resizing, shared by the
model, the checkpoint loader, the data loader, the training loops and the exported-model runner."""
