"""HRA Studio's web app: ``python -m app`` (or ``hra-studio``); see docs/app.md."""
