"""Calibration data sources, GPTQ and INT8 calibration readers (issue 5)."""
