"""Layers: base images, driver sets and application layers, and how an endpoint's tree
converges to them (rules, merge plan, journaled apply, compliance)."""
