"""The read-only web dashboard and JSON read API served by the manager on its own HTTPS port (docs/dashboard.md)."""
