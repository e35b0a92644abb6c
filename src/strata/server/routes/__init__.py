"""HTTP routes, one module per audience: agents, administrators, health and metrics."""
