"""Multi-step jobs built from passes and measurements: recipes (schema, runner), the search (search/), quickstart."""
