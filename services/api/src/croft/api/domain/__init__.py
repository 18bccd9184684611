"""What the api's handlers share: instances, their compute calls and placement,
snapshots, exec sessions, images. Nothing here imports a handler module (`routes/`)
or the app."""
