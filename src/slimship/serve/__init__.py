"""Serving: the Open Inference Protocol server (:mod:`.app`), endpoints with dynamic batching (:mod:`.endpoint`),
the protocol codec (:mod:`.protocol`), Prometheus metrics (:mod:`.metrics`) and the config (:mod:`.config`)."""
