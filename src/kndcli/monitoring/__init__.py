"""Prediction logs, the drift reference and drift reports."""
