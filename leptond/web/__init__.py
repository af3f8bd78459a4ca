"""The web UI served on the masters' HTTP port (app.py), its sessions
(sessions.py) and its static files (static/: HTML, JS and CSS, no build step)."""

from .app import WebUI

__all__ = ["WebUI"]
