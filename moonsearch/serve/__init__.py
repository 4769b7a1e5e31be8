"""``moonsearch serve``: the HTTP search API (FastAPI + uvicorn) and the search page (static files)."""
