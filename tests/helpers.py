"""Settings the test files share: the smallest model a run can train in milliseconds.

TINY_MODEL is a list of `--set` strings (what load_config(sets=...) and the CLI take): local 1D
attention on 8x8 grayscale images, one layer of width 16, unconditional (the quickstart defaults
are full attention and class-conditional). Each test file adds the train.* settings it needs.
"""

TINY_MODEL = [
    "model.attention=local1d", "model.num_classes=0",
    "model.image_size=[8, 8]", "model.channels=1", "model.n_layers=1", "model.d_model=16",
    "model.n_heads=2", "model.d_ff=32", "model.block_length=16",
]
