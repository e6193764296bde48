"""Pixel size (micrometres per pixel) from the metadata slide formats carry.

Pure functions of metadata text and numbers, one per convention: Aperio's ``MPP`` in the
SVS image description, OME-XML ``PhysicalSizeX/Y`` with their units, ImageJ's ``unit=``
with the resolution tags, plain TIFF ``XResolution``/``YResolution`` with
``ResolutionUnit``, and NGFF axis units. Each returns ``(y, x)`` micrometres per pixel,
or None when the metadata does not say (never a guess).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from fractions import Fraction
from typing import Any

__all__ = [
    "imagej_mpp",
    "length_in_um",
    "ome_xml_mpp",
    "svs_mpp",
    "tiff_resolution_mpp",
    "UM_PER",
]

#: Micrometres in one unit, for OME-XML symbols and NGFF (UDUNITS-2) names alike.
UM_PER: dict[str, float] = {
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
    "dm": 1e5,
    "decimeter": 1e5,
    "cm": 1e4,
    "centimeter": 1e4,
    "mm": 1e3,
    "millimeter": 1e3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "pm": 1e-6,
    "picometer": 1e-6,
    "å": 1e-4,
    "Å": 1e-4,
    "angstrom": 1e-4,
    "in": 25400.0,
    "inch": 25400.0,
    "ft": 304800.0,
    "foot": 304800.0,
}

# Resolutions that image software writes when it knows nothing about the optics (screen
# defaults); a microscope image at 72 dpi would have 353 um pixels.
_SOFTWARE_DEFAULT_DPI = (72.0, 96.0)


def length_in_um(value: Any, unit: str | None) -> float | None:
    """``value`` in ``unit`` as micrometres; None when the unit is missing, unknown or not
    a length (OME's "pixel", "reference frame"), or the value is not a positive number."""
    if unit is None:
        return None
    scale = UM_PER.get(str(unit).strip()) or UM_PER.get(str(unit).strip().lower())
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if scale is None or not math.isfinite(number) or number <= 0:
        return None
    return number * scale


def _pair(y: float | None, x: float | None) -> tuple[float, float] | None:
    """Both sizes, or the one given for both axes (square pixels), or None."""
    if y is None and x is None:
        return None
    return (y if y is not None else x, x if x is not None else y)  # type: ignore[return-value]


_SVS_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


def svs_mpp(description: str) -> tuple[float, float] | None:
    """Aperio SVS: the ``MPP = 0.4990`` field of the level-0 image description (square
    pixels, micrometres). None when absent or not positive."""
    match = _SVS_MPP.search(description or "")
    mpp = length_in_um(match.group(1), "um") if match else None
    return None if mpp is None else (mpp, mpp)


def ome_xml_mpp(xml: str, image: int = 0) -> tuple[float, float] | None:
    """OME-XML: ``PhysicalSizeY/X`` of ``Image`` number ``image``, in their units
    (``PhysicalSizeXUnit``, default micrometre as the OME schema says)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Image"]
    if len(images) <= image:
        return None
    pixels = [el for el in images[image] if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    attrs = pixels[0].attrib
    sizes = [
        length_in_um(attrs.get(f"PhysicalSize{a}"), attrs.get(f"PhysicalSize{a}Unit", "µm"))
        if f"PhysicalSize{a}" in attrs
        else None
        for a in "YX"
    ]
    return _pair(*sizes)


def _per_unit(resolution: Any) -> float | None:
    """A TIFF RATIONAL (numerator, denominator) or number as pixels per unit."""
    try:
        value = float(Fraction(*resolution)) if isinstance(resolution, tuple) else float(resolution)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def tiff_resolution_mpp(
    x_resolution: Any, y_resolution: Any, resolution_unit: int | None
) -> tuple[float, float] | None:
    """TIFF resolution tags: pixels per inch (unit 2) or per centimetre (unit 3) -> (y, x)
    micrometres. None for unit 1 (none) or a missing tag, and for the 72/96 dpi that
    software writes by default when it knows no pixel size."""
    unit_um = {2: UM_PER["inch"], 3: UM_PER["cm"]}.get(int(resolution_unit or 1))
    px = [_per_unit(r) for r in (y_resolution, x_resolution)]
    if unit_um is None or None in px:
        return None
    if unit_um == UM_PER["inch"] and all(p in _SOFTWARE_DEFAULT_DPI for p in px):
        return None
    return (unit_um / px[0], unit_um / px[1])  # type: ignore[operator]


def imagej_mpp(
    unit: str | None, x_resolution: Any, y_resolution: Any
) -> tuple[float, float] | None:
    r"""ImageJ TIFF: resolution tags are pixels per ``unit`` (from ImageJ's description,
    e.g. "micron", "\u00B5m", "nm"); None when the unit is not a length."""
    if not unit:
        return None
    unit = unit.encode().decode("unicode_escape") if "\\u" in unit else unit
    one = length_in_um(1.0, unit)
    px = [_per_unit(r) for r in (y_resolution, x_resolution)]
    if one is None or None in px:
        return None
    return (one / px[0], one / px[1])  # type: ignore[operator]
