"""Evaluation: text encoder (text.py), image-text (image_text.py), report.html (report.py)."""
