"""The datacenter server: sync API for agents, admin API, catalog, store, maintenance."""
