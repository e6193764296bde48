"""Slide outputs for other tools: :mod:`~mediar_ray.export.output` opens a finished
``OUTPUT/<name>.zarr`` lazily (also what the napari plugin shows);
:mod:`~mediar_ray.export.spatialdata` writes it as a SpatialData store."""
