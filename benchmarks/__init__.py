"""Benchmarks that compare regflow's registration core with MONAI on the CPU.

``python -m benchmarks.core`` times the warp, the image and deformation losses, the LocalNet
forward pass and one full training step against their MONAI counterparts, and measures each one's
peak memory in a fresh subprocess. MONAI is optional (``pip install .[bench]``): without it the
MONAI columns are empty and the table says so.
"""
