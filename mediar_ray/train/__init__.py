"""Training MEDIAR-Former: loss, targets and a single-process loop.

The distributed Ray Train path of the design is not built yet; :mod:`.simple` is the
single-process loop that trained the bundled small model.
"""
