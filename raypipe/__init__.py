"""raypipe: from raw data to load-balanced REST endpoints on a Ray cluster."""
