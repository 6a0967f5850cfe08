"""The Ray Serve application (serve/app.py) and its Ray-free parts (schemas, inference)."""
