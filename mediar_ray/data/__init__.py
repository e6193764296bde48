"""Training data: dataset mappings, MEDIAR's augmentations, modality discovery and
amplified sampling."""
