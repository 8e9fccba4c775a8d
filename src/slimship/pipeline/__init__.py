"""Multi-step jobs built from passes and measurements (the quickstart today; recipes and search later)."""
