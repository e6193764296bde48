"""Whole-slide segmentation on Ray (see :mod:`mediar_ray.pipeline.run`)."""

from mediar_ray.pipeline.run import SlideOptions, run_slides, segment_slide

__all__ = ["SlideOptions", "run_slides", "segment_slide"]
