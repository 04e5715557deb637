"""Runnable examples of driving loragate with the official tinker SDK."""
