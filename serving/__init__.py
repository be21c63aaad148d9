"""The router service: engine twins, the metrics scraper, the router and the load generator (docs/serving.md)."""
