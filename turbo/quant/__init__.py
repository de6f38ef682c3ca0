"""Quantization: GPTQ and round-to-nearest weight-only, INT8 static calibration."""
