"""Built-in feature extractors (``register_extractors``): Inception (image features), LPIPS-VGG and pixels (pair scores)."""
