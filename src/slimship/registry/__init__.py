"""Model registry: content-addressed artifacts (:mod:`.store`) and versioned metadata in SQL (:mod:`.db`)."""

from slimship.registry.api import STAGES, Registry, Version, default_root

__all__ = ["STAGES", "Registry", "Version", "default_root"]
