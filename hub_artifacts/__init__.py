"""Calibrated query bases shipped with the package (one folder per basis, each a Hub-ready repo)."""
