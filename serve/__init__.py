"""The Ray Serve application (serve/app.py: routes and builder; serve/model_deployments.py: the
model deployments) and its Ray-free parts (schemas, inference)."""
