"""Analysis: metrics (accuracy, calibration), OOD metrics, statistics over seeds, spectral analysis and
robustness measures, all pure functions over cached arrays."""
