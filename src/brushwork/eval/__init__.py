"""Evaluation: prompt faithfulness of generated images (checker) and image metrics."""
