"""Datasets: catalogue, fetch and verification, preprocessing and loading."""
