"""FastAPI app and web page over one region index: ``create_app(Settings(...))``."""

from regionsearch.api.app import create_app
from regionsearch.api.settings import Settings

__all__ = ["Settings", "create_app"]
