"""Make docs/images/napari_output.png: napari showing a real slide output through the
mediar-ray plugin (image, tissue, cells with one cell's features in the status bar and
the features table). Needs a display with OpenGL (on a headless machine:
``xvfb-run -a python docs/napari_screenshot.py OUTPUT/<name>.zarr``)."""

from __future__ import annotations

import sys
from pathlib import Path

import napari
import numpy as np
import zarr
from npe2 import PluginManager, PluginManifest
from qtpy.QtWidgets import QApplication

import mediar_ray.viewer


def main(path: str, png: str = "docs/images/napari_output.png") -> None:
    pm = PluginManager.instance()
    if "mediar-ray" not in pm:  # an editable install made before the entry point
        pm.register(
            PluginManifest.from_file(Path(mediar_ray.viewer.__file__).with_name("napari.yaml"))
        )
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.open(path, plugin="mediar-ray")
    name = Path(path).name[: -len(".zarr")]
    cells = viewer.layers[f"{name} cells"]
    cells.opacity = 0.45
    # A cell of median area: select it, and show its features as hovering it would.
    labels = np.asarray(zarr.open_group(path, mode="r")["labels/cells/0"])
    k = int(cells.features.sort_values("area").iloc[len(cells.features) // 2]["index"])
    cells.selected_label = k
    y, x = np.argwhere(labels == k).mean(axis=0)
    world = (y * cells.scale[0] + cells.translate[0], x * cells.scale[1] + cells.translate[1])
    viewer.status = cells.get_status(world, world=True)
    viewer.window.add_plugin_dock_widget("napari", "Features table widget")
    viewer.scene.camera.center = (world[0] - 70, world[1] - 40)  # the cell near the middle
    viewer.scene.camera.zoom = 4.0  # screen pixels per micrometre: about 190 um across
    for _ in range(20):
        QApplication.processEvents()
    viewer.window.screenshot(png, canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
