"""The app's tabs, one module each (`app.py` puts them together and serves them); `shared` holds what several use.

Layout and callbacks only: every computation is in `saemnesia`.
"""
