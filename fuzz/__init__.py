"""Fuzz targets shared by the hypothesis tests and the atheris entry point (`fuzz/run.py`)."""
