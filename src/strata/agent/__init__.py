"""The endpoint agent: enrolls, centralizes on a schedule, reports inventory, restores."""
