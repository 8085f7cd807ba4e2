"""Calibration: data readers, capture of activations with onnxruntime, histograms, the calibrator,
SPECs and the statistics file (stats.json)."""
