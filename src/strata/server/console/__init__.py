"""The web console, served by `strata server` at `/`: server-rendered Jinja2 pages with
htmx for the little that updates in place (vendored in static/: no internet needed)."""
