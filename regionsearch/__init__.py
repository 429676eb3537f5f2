"""regionsearch: find the region of a photo that matches a text."""

__version__ = "0.1.0"
