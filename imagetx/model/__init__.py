"""The Image Transformer: attention patterns, layers, output likelihoods and the model."""
