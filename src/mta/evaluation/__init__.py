"""Evaluation: methods scored under one protocol and one base model."""
