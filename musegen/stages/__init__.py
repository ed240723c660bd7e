"""One module per DVC stage (dvc.yaml): each is a function the CLI, dvc.yaml and flows/ call."""
