"""napari plugin ``mediar-ray`` (manifest ``napari.yaml``): a reader for slide outputs
and the "Segment cells (MEDIAR)" widget. Needs ``pip install "mediar_ray[napari]"``;
nothing else in mediar_ray imports it."""
