"""Serving: the V2 REST app over any backend (rest), Ray Serve (app), the Ray-free edge server (edge) and
the bundles that feed it (bundle). This package imports neither Ray nor torch: the edge server runs without
them."""
