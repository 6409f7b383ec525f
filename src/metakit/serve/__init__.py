"""``metakit serve``: a local web page to draw characters, add them as classes and see predictions."""
from .server import cmd_serve, make_server

__all__ = ["cmd_serve", "make_server"]
