"""The admin listener: a JSON API over the fleet's Redis, its OpenAPI document, the dashboard.

``listener``: binding (once per instance) and the HTTP/1.1 protocol (httptools, as the data
plane).  ``auth``: who may call it.  ``api``: the resources; every write goes to Redis, so
any instance's API changes the whole fleet.  ``openapi.json`` and ``static/`` ship in the
wheel: no build step, nothing fetched from elsewhere.
"""
