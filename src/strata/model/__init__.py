"""The data model shared by store, server, agent and reflector: entries, manifests, ids."""
