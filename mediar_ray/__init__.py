"""mediar_ray: MEDIAR cell instance segmentation as distributed batch processing on Ray.

The numerical core (``preprocess``, ``inference``, ``dynamics``, ``metrics``) is plain
numpy/torch and knows nothing of Ray; the Ray layers (``pipeline``, ``train``) call it.
"""

__version__ = "0.1.0"
