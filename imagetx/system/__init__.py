"""The machine: processes and devices (distributed), precision and the CPU's features, the
memory allocator, torch.compile where the machine can build its code, cache paths, and the
file-system primitives every layer above writes with (atomic writes, locks). Imports nothing of
imagetx but errors, console and checks."""
