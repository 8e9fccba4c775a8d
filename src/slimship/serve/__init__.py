"""Serving, one module per concept: the config and wire models (:mod:`.config`), the protocol codec
(:mod:`.protocol`), endpoints with dynamic batching (:mod:`.endpoint`), routing between versions (:mod:`.routing`),
background compares (:mod:`.compare`), the server's state (:mod:`.server`), the HTTP app (:mod:`.http`), rollouts
(:mod:`.rollout`) and their gates (:mod:`.gates`), drift (:mod:`.drift`), A/B outcomes (:mod:`.abtest`), metrics
(:mod:`.metrics`), the dashboard (:mod:`.dashboard`), running it (:mod:`.run`) and Ray Serve (:mod:`.ray_serve`)."""
