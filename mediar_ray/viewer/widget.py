"""The "Segment cells (MEDIAR)" dock widget.

It segments the chosen image layer with the bundled model or chosen checkpoints
(:mod:`mediar_ray.viewer.segment`), in a napari worker thread so the viewer stays live:
a progress bar follows the steps, Cancel stops the worker at the next step, and the
result is added as a labels layer (same scale and translation as the image) whose
features are the cells' rows of the cell table.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from mediar_ray.viewer.segment import (
    PRECISIONS,
    Progress,
    SegmentRequest,
    WidgetResult,
    run_segmentation,
)

__all__ = ["SegmentWidget"]


class SegmentWidget(QWidget):
    """Dock widget; ``napari_viewer`` is given by napari (npe2 widget contribution)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self.last_result: WidgetResult | None = None
        self.layer_box = QComboBox()
        self.weights = QLineEdit()
        self.weights.setPlaceholderText("bundled model (or checkpoint paths, ';'-separated)")
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse)
        self.tta = QCheckBox("test-time augmentation (4 flips)")
        self.precision = QComboBox()
        self.precision.addItems(list(PRECISIONS))
        self.window = QSpinBox()
        self.window.setRange(0, 4096)
        self.window.setSingleStep(32)
        self.window.setSpecialValueText("model's own")
        self.run_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.run_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)

        form = QFormLayout()
        form.addRow("image layer", self.layer_box)
        row = QHBoxLayout()
        row.addWidget(self.weights)
        row.addWidget(browse)
        form.addRow("checkpoints", row)
        form.addRow("", self.tta)
        form.addRow("precision", self.precision)
        form.addRow("window (px)", self.window)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    def _refresh_layers(self, *_: Any) -> None:
        from napari.layers import Image

        current = self.layer_box.currentText()
        self.layer_box.clear()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        self.layer_box.addItems(names)
        if current in names:
            self.layer_box.setCurrentText(current)

    def _browse(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self, "MEDIAR checkpoints", "", "Checkpoints (*.safetensors *.pth *.pt)"
        )
        if paths:
            self.weights.setText(";".join(paths))

    def request(self) -> SegmentRequest:
        """The options as set in the widget."""
        weights = [w.strip() for w in self.weights.text().split(";") if w.strip()]
        return SegmentRequest(
            weights=weights,
            tta=self.tta.isChecked(),
            precision=self.precision.currentText(),
            roi_size=self.window.value() or None,
        )

    def start(self) -> Any:
        """Segment the chosen layer in a worker thread; returns the worker."""
        from napari.qt.threading import create_worker

        name = self.layer_box.currentText()
        if not name:
            self.status.setText("no image layer to segment")
            return None
        layer = self.viewer.layers[name]
        data = layer.data[0] if layer.multiscale else layer.data
        self.worker = create_worker(run_segmentation, data, self.request(), rgb=layer.rgb)
        self.worker.yielded.connect(lambda item: self._step(item, layer))
        self.worker.errored.connect(lambda err: self.status.setText(f"failed: {err}"))
        self.worker.aborted.connect(lambda: self.status.setText("cancelled"))
        self.worker.finished.connect(self._idle)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("starting")
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Stop the worker at its next step (the step running now finishes first)."""
        if self.worker is not None:
            self.worker.quit()

    def _idle(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _step(self, item: Progress | WidgetResult, layer: Any) -> None:
        if isinstance(item, Progress):
            self.progress.setMaximum(item.total)
            self.progress.setValue(item.done - 1)
            self.status.setText(item.message)
            return
        self.last_result = item
        self.progress.setValue(self.progress.maximum())
        self.status.setText(
            f"{len(item.features)} cells" + (" (tiled, as the slide job)" if item.tiled else "")
        )
        self.viewer.add_labels(
            item.labels,
            name=f"{layer.name} cells",
            features=item.features,
            scale=layer.scale[-2:],
            translate=layer.translate[-2:],
        )
