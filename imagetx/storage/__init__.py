"""Files on disk in imagetx's own formats: checkpoints, the export folder, image files and the
layered TOML loader. Builds on system/ (atomic writes), data/ and model/ (a checkpoint knows the
model it holds)."""
