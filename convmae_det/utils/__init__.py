"""Small helpers with no model code, shared by the model and the exported-model runner."""
