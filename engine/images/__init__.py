"""Image files in and out: discovery, decoding, tensor image ops, loaders, datasets, previews."""
