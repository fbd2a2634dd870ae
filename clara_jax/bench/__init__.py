"""Throughput and MFU measurements (figures are printed, never asserted in tests)."""
