"""croft's api service: LXD's REST API (`/1.0`) over the cluster store.

A leaf: import what you need from its modules (`croft.api.app.create_app`,
`croft.api.context.ApiSettings`, `croft.api.serving.serve_unix`, ...).
"""
