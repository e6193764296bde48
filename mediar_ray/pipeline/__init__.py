"""Whole-slide segmentation of archives on Ray (see :mod:`mediar_ray.pipeline.run`)."""

from mediar_ray.pipeline.options import OptionError, SlideOptions
from mediar_ray.pipeline.run import run_slides

__all__ = ["OptionError", "SlideOptions", "run_slides"]
