"""One module per DVC stage (dvc.yaml): each is a function the CLI, dvc.yaml and flows/ call.

sweep_page.py is the sweep stage's HTML page (open and blind), kept apart from its clips."""
