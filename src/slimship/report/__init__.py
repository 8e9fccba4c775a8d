"""Human-readable renderings of slimship's JSON results."""
