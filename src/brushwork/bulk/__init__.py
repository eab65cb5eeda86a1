"""Bulk generation from prompt files, spread over a Ray cluster."""
