"""Flow dynamics: labels -> flows (training targets) and flows -> labels (post-processing).

Pure numpy/numba; no Ray. The training loader, the single-image path and the slide
pipeline all call these two functions.
"""

from mediar_ray.dynamics.heat import labels_to_flows
from mediar_ray.dynamics.masks import flows_to_labels

__all__ = ["flows_to_labels", "labels_to_flows"]
